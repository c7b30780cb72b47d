"""Guest programs and the minimal VMM that runs them through any `Kernel`.

* ``src/*.S`` + ``src/*.bin`` -- the programs (assembler source and its bytes),
  rebuilt by ``tools/build_guests.py`` (:mod:`fakekvm.guests.build`);
* :mod:`~fakekvm.guests.ports` -- the port protocol guest <-> VMM;
* :mod:`~fakekvm.guests.layout` -- guest-physical layout, page tables, GDT, sregs;
* :mod:`~fakekvm.guests.image` -- :class:`GuestImage`, images as data;
* :mod:`~fakekvm.guests.workloads` -- images of hello/toucher/writer/verifier/echo
  and Python mirrors of their results;
* :mod:`~fakekvm.guests.vm` -- :class:`GuestVM`, the VMM; :class:`RunResult`;
* :mod:`~fakekvm.guests.vmm` -- what every VMM here shares (``GuestVM``, post-copy's
  ``DestVM``): answering port/MMIO exits, VM and vCPU set-up, one ``close``;
* :mod:`~fakekvm.guests.compare` -- run one image on two kernels and compare.
"""

from fakekvm.guests.exits import Exit, decode_exit, exit_name
from fakekvm.guests.image import Chunk, GuestImage, long_mode_image, real_mode_image
from fakekvm.guests.vm import GuestError, GuestVM, RunResult
from fakekvm.guests.workloads import (
    HELLO_MESSAGE,
    Pattern,
    TouchParams,
    checksum,
    echo_image,
    expected_checksum,
    expected_touch_report,
    hello_image,
    pattern_bytes,
    touch_order,
    toucher_image,
    verifier_image,
    writer_image,
)

__all__ = [
    "HELLO_MESSAGE",
    "Chunk",
    "Exit",
    "GuestError",
    "GuestImage",
    "GuestVM",
    "Pattern",
    "RunResult",
    "TouchParams",
    "checksum",
    "decode_exit",
    "echo_image",
    "exit_name",
    "expected_checksum",
    "expected_touch_report",
    "hello_image",
    "long_mode_image",
    "pattern_bytes",
    "real_mode_image",
    "touch_order",
    "toucher_image",
    "verifier_image",
    "writer_image",
]
