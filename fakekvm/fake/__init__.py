"""The fake kernel: `FakeKernel` and the objects behind its fds."""

from fakekvm.fake.kernel import FakeKernel, ManualClock

__all__ = ["FakeKernel", "ManualClock"]
