# Sourced by the testbed's /init (testbed/lib/guest/init) before COMMAND: load
# KVM for the emulated AMD CPU (nested SVM + NPT). kvm_amd pulls in kvm, ccp
# and irqbypass through modules.dep. Quiet unless something is wrong.
if ! modprobe kvm_amd 2>/tmp/kt-kvm-amd.err; then
    echo "testbed: modprobe kvm_amd failed: $(cat /tmp/kt-kvm-amd.err)"
elif [[ ! -c /dev/kvm ]]; then
    echo "testbed: kvm_amd loaded but /dev/kvm is missing"
elif [[ $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) != Y ]]; then
    echo "testbed: kvm_amd loaded with npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
fi
