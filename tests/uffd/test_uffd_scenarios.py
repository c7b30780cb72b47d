"""The userfaultfd scenario suite (fakekvm.testing.uffd_scenarios) on the real and the fake kernel.

Every scenario's record must equal the record measured on the live Linux 6.18 kernel of this
project's host (EXPECTED below; regenerate by running the scenarios on RealKernel and reviewing the
diff against /work/shared/reference/uapi.md §5). The fake must produce the very same records.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakekvm.kernel.real import RealKernel
from fakekvm.testing.uffd_scenarios import HUGETLB_SCENARIOS, SCENARIOS

# fmt: off
EXPECTED: dict[str, dict[str, Any]] = {'api': {'register_before': ('EINVAL', 30583),
         'read_before': 'EINVAL',
         'poll_before': [8],
         'wake_before': 'EINVAL',
         'bad_api': ('EINVAL', (0, 0, 0)),
         'bad_feature': ('EINVAL', (0, 0, 0)),
         'bad_feature_hi': ('EINVAL', (0, 0, 0)),
         'ok': ('0', (170, 131071, 9223372036854775811)),
         'second': ('EINVAL', (0, 0, 0)),
         'unknown_nr': 'EINVAL',
         'foreign_ioctl': 'EINVAL',
         'write': 'EBADF',
         'poll_after': [],
         'fionbio_off': '0',
         'poll_blocking': [8],
         'fionbio_on': '0',
         'poll_nonblocking': [],
         'all_features': ('0', (170, 131071, 9223372036854775811))},
 'close_wakes': {'joined': True, 'content': '5a', 'reregister': ('0', 316)},
 'continue': {'msg': [('PAGEFAULT', '0x4', '0x0', 0, 0, 0, 0, 0)],
              'continue': ('0', 4096),
              'joined': (True, 119),
              'content': '77',
              'eexist': ('EEXIST', -17),
              'not_in_cache': ('EFAULT', -14),
              'unaligned': ('EINVAL', 30583),
              'bad_mode': ('EINVAL', 30583),
              'mode_wp_not_wp': ('EINVAL', -22),
              'msg_write': [('PAGEFAULT', '0x5', '0x2000', 0, 0, 0, 0, 0)],
              'continue2': ('0', 4096),
              'joined2': True,
              'missing_page_no_fault': (True,),
              'anon': ('EINVAL', -22)},
 'continue_fallocated': {'hole': ('EFAULT', -14),
                         'seek_after_fallocate': 'ENXIO',
                         'fallocated': ('0', 4096),
                         'content': '00',
                         'again': ('EEXIST', -17),
                         'punched': ('EFAULT', -14),
                         'refilled': ('0', 4096),
                         'refilled_content': '00',
                         'range': ('0', 8192),
                         'fallocated_then_punched': ('EFAULT', -14),
                         'fallocated_then_truncated': ('EFAULT', -14)},
 'copy': {'ok': ('0', 4096),
          'content': 'abababab',
          'eexist': ('EEXIST', -17),
          'unaligned_dst': ('EINVAL', 30583),
          'unaligned_len': ('EINVAL', 30583),
          'len0': ('EINVAL', 30583),
          'bad_mode': ('EINVAL', 30583),
          'mode_wp_not_wp': ('EINVAL', -22),
          'unregistered_dst': ('ENOENT', -2),
          'unmapped_dst': ('ENOENT', -2),
          'cross_vma': ('ENOENT', -2),
          'bad_src': ('EFAULT', -14),
          'low_src': ('EFAULT', -14),
          'unaligned_src': ('0', 4096),
          'unaligned_src_content': 'ab',
          'partial': ('0', 8192),
          'partial_hits_populated': ('ENOENT', -2),
          'page3': 'ab'},
 'copy_partial': {'copy': ('EAGAIN', 4096), 'pages': ('42', '01')},
 'create_flags': {'0': 'fd',
                  'CLOEXEC': 'fd',
                  'NONBLOCK': 'fd',
                  'USER_MODE_ONLY': 'fd',
                  'all': 'fd',
                  'O_RDWR': 'EINVAL',
                  'bit1': 'EINVAL',
                  'O_APPEND': 'EINVAL',
                  'bit31': 'EINVAL'},
 'dev_userfaultfd': {'new': 'fd',
                     'api': ('0', (170, 131071, 9223372036854775811)),
                     'read_empty': 'EAGAIN',
                     'new_bad_flags': 'EINVAL',
                     'other_ioctl': 'EINVAL',
                     'other_nr': 'EINVAL',
                     'read_dev': 'EINVAL'},
 'esrch': {'copy': ('ESRCH', 30583),
           'copy_invalid': ('EINVAL', 30583),
           'zeropage': ('ESRCH', 30583),
           'poison': ('ESRCH', 30583),
           'move': ('EINVAL', 30583),
           'wake': '0',
           'read': 'EAGAIN'},
 'move': {'move': ('0', 4096),
          'content': ('60', '00'),
          'eexist': ('EEXIST', -17),
          'src_hole': ('ENOENT', -2),
          'src_hole_allowed': ('0', 4096),
          'partial': ('EAGAIN', 4096),
          'unaligned_src': ('EINVAL', 30583),
          'unaligned_dst': ('EINVAL', 30583),
          'len0': ('EINVAL', 30583),
          'bad_mode': ('EINVAL', 30583),
          'unregistered_dst': ('EINVAL', -22),
          'overlap': ('ENOENT', -2),
          'ok2': ('0', 4096),
          'without_feature': ('0', 4096)},
 'pagefault_msgs': {'write': ([('PAGEFAULT', '0x1', '0x0', 0, 0, 0, 0, 0)], ('0', 4096), True),
                    'read': ([('PAGEFAULT', '0x0', '0x0', 0, 0, 0, 0, 0)], ('0', 4096), True),
                    'write_exact': ([('PAGEFAULT', '0x1', '0x123', 0, 0, 0, 0, 0)],
                                    ('0', 4096),
                                    True),
                    'read_inexact': ([('PAGEFAULT', '0x0', '0x0', 0, 0, 0, 0, 0)],
                                     ('0', 4096),
                                     True),
                    'thread_id': ([('PAGEFAULT', '0x1', '0x0', 'tid', 0, 0, 0, 0)],
                                  ('0', 4096),
                                  True)},
 'poison': {'poison': ('0', 4096),
            'again': ('EEXIST', -17),
            'zeropage_over': ('EEXIST', -17),
            'bad_mode': ('EINVAL', 30583),
            'unaligned': ('EINVAL', 30583),
            'touch': 'SIGBUS',
            'copy_over': ('0', 4096),
            'touch_after_copy': 'ok',
            'other_page_zero': ('0', 4096)},
 'read_poll': {'short': 'EINVAL',
               'empty': 'EAGAIN',
               'poll_empty': [],
               'poll_two': [(True, 1)],
               'read_short_with_events': 'EINVAL',
               'read128': [('PAGEFAULT', '0x1', '0x0', 0, 0, 0, 0, 0),
                           ('PAGEFAULT', '0x0', '0x1000', 0, 0, 0, 0, 0)],
               'poll_after_read': [],
               'read_again': 'EAGAIN',
               'copy': ('0', 4096),
               'zero': ('0', 4096),
               'joined': (True, True),
               'blocking_poll_before_api': [8],
               'blocking_poll_idle': [8],
               'blocking_read': (True, [('PAGEFAULT', '0x1', '0x0', 0, 0, 0, 0, 0)]),
               'blocking_poll_busy': [8],
               'blocking_copy': ('0', 4096),
               'blocking_joined': True},
 'register': {'mode0': ('EINVAL', 30583),
              'mode8': ('EINVAL', 30583),
              'unaligned_start': ('EINVAL', 30583),
              'unaligned_len': ('EINVAL', 30583),
              'len0': ('EINVAL', 30583),
              'no_mapping': ('EINVAL', 30583),
              'minor_anon': ('EINVAL', 30583),
              'missing': ('0', 316),
              'missing_again': ('0', 316),
              'missing_wp': ('0', 380),
              'wp_only': ('0', 380),
              'other_uffd_busy': ('EBUSY', 30583),
              'other_uffd_free_part': ('0', 316),
              'other_uffd_unregister': 'EINVAL',
              'unregister': '0',
              'unregister_unaligned': 'EINVAL',
              'unregister_len0': 'EINVAL',
              'unregister_no_mapping': 'EINVAL',
              'unregister_unregistered': '0',
              'copy_after_unregister': ('ENOENT', -2),
              'reregister_after': ('0', 316),
              'shmem_missing_minor': ('0', 444),
              'shmem_wp': ('0', 380),
              'shmem_missing': ('0', 316),
              'shmem_all': ('0', 508),
              'shared_anon_minor': ('0', 444)},
 'remove_event': {'poll': [1],
                  'raiser_waits': True,
                  'copy': ('EAGAIN', -11),
                  'copy_invalid': ('EAGAIN', -11),
                  'zeropage': ('EAGAIN', -11),
                  'poison': ('EAGAIN', -11),
                  'move': ('EAGAIN', -11),
                  'writeprotect': 'EAGAIN',
                  'continue': ('EAGAIN', -11),
                  'wake': '0',
                  'register': ('0', 316),
                  'msg': [('REMOVE', '0x0', '0x2000', 0, 0, 0, 0)],
                  'raiser_done': True,
                  'copy_after': ('0', 4096),
                  'content_after_dontneed': ('0', 4096),
                  'order': [('PAGEFAULT', '0x1', '0x3000', 0, 0, 0, 0, 0),
                            ('REMOVE', '0x2000', '0x3000', 0, 0, 0, 0)],
                  'raiser2_done': True,
                  'copy3': ('0', 4096),
                  'joined': True},
 'unmap_remap_events': {'raiser_waits': True,
                        'copy_while_unread': ('EAGAIN', -11),
                        'unmap': [('UNMAP', '0x3000', '0x4000', 0, 0, 0, 0)],
                        'unmap_done': True,
                        'remap_waits': True,
                        'copy_while_remap_unread': ('EAGAIN', -11),
                        'remap': [('REMAP', '0x0', '0x5000', '0x2000', 0, 0, 0)],
                        'remap_done': (True, '0x5000'),
                        'copy_at_old': ('ENOENT', -2),
                        'copy_at_rest': ('0', 4096),
                        'no_more': 'EAGAIN',
                        'no_feature_events': 'EAGAIN'},
 'user_mode_only': {'kernel_access': 'EFAULT',
                    'no_msg': 'EAGAIN',
                    'user_fault': [('PAGEFAULT', '0x1', '0x1000', 0, 0, 0, 0, 0)],
                    'copy': ('0', 4096),
                    'joined': True},
 'wake': {'len0': 'EINVAL',
          'unaligned': 'EINVAL',
          'idle': '0',
          'unregistered': '0',
          'msg': [('PAGEFAULT', '0x1', '0x0', 0, 0, 0, 0, 0)],
          'copy_dontwake': ('0', 4096),
          'msgs_after_dontwake': 'EAGAIN',
          'eexist_no_wake': ('EEXIST', -17),
          'wake_other_page': '0',
          'wake': '0',
          'joined': True,
          'content': '5a55',
          'first': [('PAGEFAULT', '0x0', '0x1000', 0, 0, 0, 0, 0)],
          'wake_unresolved': '0',
          'refault': [('PAGEFAULT', '0x0', '0x1000', 0, 0, 0, 0, 0)],
          'zero': ('0', 4096),
          'joined2': True},
 'writeprotect': {'wp_dontwake': 'EINVAL',
                  'bad_mode': 'EINVAL',
                  'unaligned': 'EINVAL',
                  'len0': 'EINVAL',
                  'not_wp_registered': 'ENOENT',
                  'unregistered': 'ENOENT',
                  'protect': '0',
                  'protect_again': '0',
                  'read_ok': '01',
                  'msg': [('PAGEFAULT', '0x3', '0x0', 0, 0, 0, 0, 0)],
                  'unprotect_dontwake': '0',
                  'wake': '0',
                  'joined': True,
                  'content': '5a',
                  'protect2': '0',
                  'msg2': [('PAGEFAULT', '0x3', '0x0', 0, 0, 0, 0, 0)],
                  'unprotect': '0',
                  'joined2': True,
                  'missing_msg': [('PAGEFAULT', '0x1', '0x1000', 0, 0, 0, 0, 0)],
                  'copy_wp': ('0', 4096),
                  'msg_after_copy_wp': [('PAGEFAULT', '0x3', '0x1000', 0, 0, 0, 0, 0)],
                  'unprotect3': '0',
                  'joined3': True},
 'zeropage': {'ok': ('0', 4096),
              'content': '00000000',
              'eexist': ('EEXIST', -17),
              'unaligned': ('EINVAL', 30583),
              'len0': ('EINVAL', 30583),
              'bad_mode': ('EINVAL', 30583),
              'partial': ('ENOENT', -2),
              'two': ('0', 8192),
              'shmem': ('0', 4096),
              'shmem_eexist_pagecache': ('EEXIST', -17),
              'shmem_copy_eexist_pagecache': ('EEXIST', -17)},
 'shmem_missing_wp': {'missing_msg': [('PAGEFAULT', '0x0', '0x0', 0, 0, 0, 0, 0)],
    'copy': ('0', 4096),
    'joined': (True, 110),
    'other_mapping_sees_it': '6e',
    'present_in_cache_no_fault': True,
    'protect': '0',
    'wp_msg': [('PAGEFAULT', '0x3', '0x1000', 0, 0, 0, 0, 0)],
    'unprotect': '0',
    'joined_wp': True,
    'protect_missing': '0',
    'missing_then': [('PAGEFAULT', '0x1', '0x2000', 0, 0, 0, 0, 0)],
    'zeropage': ('0', 4096),
    'joined_missing': True,
    'anon_wp': (True, 'EAGAIN'),
    'anon_wp_unpopulated': ([('PAGEFAULT', '0x3', '0x0', 0, 0, 0, 0, 0)], '0', True)},
 'same_page_two_threads': {'msgs': [('PAGEFAULT', '0x0', '0x0'), ('PAGEFAULT', '0x1', '0x0')],
                           'tids': True,
                           'copy': ('0', 4096),
                           'joined': (True, True, 43),
                           'after': 'EAGAIN'}}
# fmt: on


def _fake() -> Any:
    try:
        from fakekvm.fake import FakeKernel
    except ImportError as e:  # pragma: no cover - until E1 lands
        pytest.skip(f"FakeKernel not available yet: {e}")
    return FakeKernel(profile="6.18-pvm")


def test_every_scenario_has_an_expectation() -> None:
    assert set(SCENARIOS) == set(EXPECTED)


@pytest.mark.real_uffd
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_real(name: str) -> None:
    assert SCENARIOS[name](RealKernel()) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_fake(name: str) -> None:
    k = _fake()
    try:
        assert SCENARIOS[name](k) == EXPECTED[name]
    finally:
        k.shutdown()


HUGETLB_EXPECTED: dict[str, dict[str, Any]] = {
    "hugetlb_2m": {
        "register_unaligned": ("EINVAL", 30583),
        "register_len_unaligned": ("EINVAL", 30583),
        "register": ("0", 0x10C),  # hugetlb: the BASIC range ioctls (no ZEROPAGE, no MOVE)
        "msg": [("PAGEFAULT", "0x1", "0x0", 0, 0, 0, 0, 0)],  # masked to the 2 MiB page
        "copy_small": ("EINVAL", -22),
        "zeropage": ("EINVAL", -22),
        "copy": ("0", 2 << 20),
        "joined": True,
        "content": ("4d4d", "5a", "00"),
        "eexist": ("EEXIST", -17),
        "unregister_unaligned": "EINVAL",
    }
}

_NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def reserved_hugepages() -> Any:
    """Reserve four 2 MiB pages on the host for the test, and give them back after."""
    try:
        with open(_NR_HUGEPAGES) as f:
            before = int(f.read())
        with open(_NR_HUGEPAGES, "w") as f:
            f.write(str(before + 4))
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) for line in f if line.startswith("HugePages_Free"))
    except (OSError, StopIteration, ValueError) as e:
        pytest.skip(f"cannot reserve 2 MiB huge pages: {e}")
    if free < 4:
        with open(_NR_HUGEPAGES, "w") as f:
            f.write(str(before))
        pytest.skip(f"only {free} free 2 MiB huge pages after reserving")
    yield
    with open(_NR_HUGEPAGES, "w") as f:
        f.write(str(before))


@pytest.mark.real_uffd
@pytest.mark.parametrize("name", sorted(HUGETLB_EXPECTED))
def test_hugetlb_scenario_real(name: str, reserved_hugepages: Any) -> None:
    assert HUGETLB_SCENARIOS[name](RealKernel()) == HUGETLB_EXPECTED[name]


@pytest.mark.parametrize("name", sorted(HUGETLB_EXPECTED))
def test_hugetlb_scenario_fake(name: str) -> None:
    k = _fake()
    try:
        assert HUGETLB_SCENARIOS[name](k) == HUGETLB_EXPECTED[name]
    finally:
        k.shutdown()
