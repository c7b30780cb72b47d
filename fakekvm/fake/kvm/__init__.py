"""The fake KVM: ``/dev/kvm`` (`system`), VMs (`vm`), memslots, dirty log,
second-stage translation (`translate`) and vCPUs (`vcpu`).

Models ``virt/kvm/kvm_main.c`` and ``arch/x86/kvm`` of Linux 6.18 behind a
kernel `Profile` (``fakekvm.fake.profiles``); ``register(kernel)`` installs
``/dev/kvm`` into a `FakeKernel`.
"""

from fakekvm.fake.kvm.system import FakeKvmDevice, register
from fakekvm.fake.kvm.translate import Kind, Translation

__all__ = ["FakeKvmDevice", "Kind", "Translation", "register"]
