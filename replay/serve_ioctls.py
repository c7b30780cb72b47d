"""`ioctl` on a `replay.serve.ReplayKernel`: matched, gated, or answered by the model.

`ServeIoctls` (between `replay.serve_core.ServeCore` and `ReplayKernel`) holds:

* ``ioctl`` itself: an ioctl is matched to the recorded one and its recorded output written
  into the caller's buffer, addresses translated to the live mappings;
* ``KVM_RUN``: held until the pages its recorded faults waited for are filled (`_run_gate`),
  then the recorded ``kvm_run`` bytes are written into the live mapping of that vCPU's
  ``kvm_run`` (`_write_run`), remembering where the VMM answers an IO IN / MMIO read exit so
  the next ``KVM_RUN``'s input can be matched as recorded;
* the ioctls answered by `replay.serve_model.ServeModel` instead of matched: fills and wakes
  on a userfaultfd (`_fill`, with their memory effect: ``UFFDIO_COPY`` copies ``src`` to
  ``dst`` in the live mappings, ``UFFDIO_ZEROPAGE`` zeroes), and workers'
  ``KVM_SET_MEMORY_ATTRIBUTES`` the ordered stream does not have (`_set_attributes`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

from fakekvm.abi import kvm, uffd
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import IoctlArg
from replay.events import Call
from replay.serve_core import ServeCore
from replay.serve_fills import FILLS, MODEL_UFFD_IOCTLS, ModelDivergence
from replay.show import KVM_RUN_RECORDED, kvm_run_io_data

__all__ = ["ServeIoctls"]


class ServeIoctls(ServeCore):
    """The ioctls of `ReplayKernel` (see the module docstring)."""

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        from fakekvm.abi import names

        name = names.ioctl_name(request)
        if isinstance(arg, int):
            inp = b""
            run = self._runs.get(fd) if request == kvm.KVM_RUN else None
            if run is not None:
                ans = self._answer.pop(fd, None)
                if ans is not None:
                    inp = bytes(run.view()[ans[0] : ans[0] + ans[1]])
            rec = self._match("ioctl", fd, request=request, name=name, iarg=arg, inp=inp)
            assert rec is not None
            if request == kvm.KVM_RUN:
                self._run_gate(fd, rec)
            if run is not None and rec.out:
                self._write_run(fd, run, rec.out)
            self._raise(rec)
            return rec.ret
        buf = memoryview(arg).cast("B")  # type: ignore[arg-type]
        kind = self.kinds.get(fd, "")
        if kind == "userfaultfd" and request in MODEL_UFFD_IOCTLS:
            return self._fill(fd, request, name, buf)
        if request == kvm.KVM_SET_MEMORY_ATTRIBUTES:
            rec = self._match("ioctl", fd, lenient=True, request=request, name=name, inp=bytes(buf))
            if rec is None:
                return self._set_attributes(fd, request, name, buf)
        else:
            rec = self._match("ioctl", fd, request=request, name=name, inp=bytes(buf))
        assert rec is not None
        out = self._out(rec)
        if out:
            n = min(len(out), len(buf))
            buf[:n] = out[:n]
        self._raise(rec)
        return rec.ret

    # -- KVM_RUN ------------------------------------------------------------------------------
    def _run_gate(self, fd: int, rec: Call) -> None:
        """Hold a KVM_RUN until the pages its recorded faults waited for are filled."""
        kind = self.kinds.get(fd, "")
        if not kind.startswith("kvm-vcpu:"):
            return
        vcpu = int(kind.split(":", 1)[1])
        model = self.model
        with self._lock:
            index = model.run_entered(vcpu, threading.get_native_id())
            self._cond.notify_all()
            if not model.run_gates.get((vcpu, index)):
                return
            if not self._wait(lambda: not model.run_waits_for(vcpu, index)):
                left = model.run_waits_for(vcpu, index)
                raise self._stuck(
                    self._live("ioctl", fd, request=kvm.KVM_RUN, name="KVM_RUN", iarg=0),
                    f"vCPU {vcpu}'s KVM_RUN #{rec.seq} returned in the recording once page(s) "
                    f"{', '.join(hex(self.addresses.word_a_to_b(a)) for a in left[:3])} were "
                    "filled; the live run never filled them",
                    rec,
                )

    def _write_run(self, fd: int, m: Mapping, out: bytes) -> None:
        """Put the recorded kvm_run bytes (head, then IO data if any) in the live page."""
        view = m.view()
        if len(out) < kvm.KVM_RUN_EXIT_OFFSET:
            view[: len(out)] = out
            return
        reason = kvm.kvm_run_exit_reason_fmt.unpack_from(out, kvm.KVM_RUN_EXIT_REASON_OFFSET)[0]
        data = kvm_run_io_data(out) if reason == kvm.KVM_EXIT_IO else None
        head = out[: KVM_RUN_RECORDED if data is not None else len(out)][: len(view)]
        view[: len(head)] = head
        if reason == kvm.KVM_EXIT_IO:
            direction, size, _port, count, off = kvm.kvm_run_io_fmt.unpack_from(
                out, kvm.KVM_RUN_EXIT_OFFSET
            )
            n = size * count
            if data is not None and off + len(data) <= len(view):
                view[off : off + len(data)] = data
            if direction == kvm.KVM_EXIT_IO_IN and n and off + n <= len(view):
                self._answer[fd] = (off, n)
        elif reason == kvm.KVM_EXIT_MMIO and len(out) > 52 and out[52] == 0:
            self._answer[fd] = (kvm.KVM_RUN_EXIT_OFFSET + 8, 8)  # mmio.data of a read

    # -- the model's ioctls ------------------------------------------------------------------
    def _fill(self, fd: int, request: int, name: str, buf: memoryview) -> int:
        """A fill or wake on a userfaultfd, answered by the model (with its memory effect)."""
        live_inp = bytes(buf)
        live = self._live("ioctl", fd, request=request, name=name, inp=live_inp)
        am = self.addresses
        with self._lock:
            if self.divergence is not None:
                raise OSError(errno.EPROTO, "replay stopped: the run diverged from the trace")
            if request == uffd.UFFDIO_WAKE:
                err = self.model.wake(fd, am.bytes_b_to_a(live_inp))
                if err:
                    raise OSError(err, f"{name}: {os.strerror(err)} (served)")
                return 0
            kind = FILLS[request]
            vals = list(kind.fmt.unpack_from(live_inp))
            dst, length = vals[0], vals[kind.len_i]
            src = vals[1] if request == uffd.UFFDIO_COPY else 0
            if request == uffd.UFFDIO_COPY and not self._ours(src, length):
                vals[kind.prog_i] = -errno.EFAULT
                kind.fmt.pack_into(buf, 0, *vals)
                raise OSError(errno.EFAULT, f"{name}: src {src:#x} is not mapped (served)")
            rec_inp = bytearray(live_inp)
            struct.pack_into("<Q", rec_inp, 0, am.word_b_to_a(dst))
            try:
                ans = self.model.fill(fd, request, bytes(rec_inp))
            except ModelDivergence as e:
                raise self._model_divergence(e, live) from None
            if ans.done and self._ours(dst, ans.done):
                if request == uffd.UFFDIO_COPY:
                    ctypes.memmove(dst, src, ans.done)
                elif request == uffd.UFFDIO_ZEROPAGE:
                    ctypes.memset(dst, 0, ans.done)
            self._cond.notify_all()
        vals[kind.prog_i] = ans.result
        kind.fmt.pack_into(buf, 0, *vals)
        if ans.errno:
            raise OSError(ans.errno, f"{name}: {os.strerror(ans.errno)} (served)")
        return 0

    def _ours(self, address: int, length: int) -> bool:
        """Is ``[address, address+length)`` inside one mapping this kernel made?"""
        return any(a <= address and address + length <= a + n for a, n in self._maps.items())

    def _set_attributes(self, fd: int, request: int, name: str, buf: memoryview) -> int:
        live = self._live("ioctl", fd, request=request, name=name, inp=bytes(buf))
        with self._lock:
            try:
                err = self.model.set_attributes(bytes(buf))
            except ModelDivergence as e:
                raise self._model_divergence(e, live) from None
        if err:
            raise OSError(err, f"{name}: {os.strerror(err)} (served)")
        return 0
