// A bare-metal aarch64 guest for QEMU's virt machine, small enough to run as a
// nested KVM guest inside the TCG-emulated testbed (issue 7: kvmtrace
// recording QEMU end to end, and attaching to a QEMU already running). Loaded
// with `-kernel` as an ELF; it runs at EL1 with the MMU off (every data access
// is Device memory, so all stores below are aligned) and:
//   1. writes one word into each of PAYLOAD_PAGES pages of RAM from DATA_BASE
//      (a stage-2 fault in QEMU's RAM memslot per page when RAM is not backed
//      by huge pages: the test uses a memfd backend, whose shmem THP is off);
//   2. assigns the ivshmem-plain device at 00:01.0 its BAR2 through the low
//      ECAM (-M virt,highmem=off) at BAR_GPA and turns on memory decoding, so
//      QEMU maps the BAR and gives KVM a memslot for it;
//   3. writes one word into each of BAR_PAGES pages of the BAR, then the READY
//      word at BAR offset 0, which the host sees in the backend's file;
//   4. waits until the host writes GO_WORD at BAR offset 8 (or TIMEOUT_S pass,
//      counted with the generic timer: then it powers off at once);
//   5. after GO, writes one word into each of PHASE2_PAGES pages of RAM from
//      DATA2_BASE: faults that come after the host had time to attach a
//      recorder to this QEMU (tests/test_qemu_attach_arm64.py);
//   6. powers off with PSCI SYSTEM_OFF (HVC: QEMU virt's PSCI conduit under KVM).
// Built in the testbed with the root's gcc:
//   gcc -nostdlib -static -Wl,-Ttext=0x40200000 -Wl,--build-id=none -o payload.elf qemu-payload.S
// The numbers here are the tests' (tests/test_qemu_arm64.py and
// tests/test_qemu_attach_arm64.py read them back from this file's #defines).
#define DATA_BASE      0x41000000
#define PAYLOAD_PAGES  64
#define ECAM_BASE      0x3f000000
#define IVSHMEM_CFG    (ECAM_BASE + (1 << 15))   /* bus 0, device 1, function 0 */
#define IVSHMEM_ID     0x11101af4                /* device 0x1110, vendor 0x1af4 */
#define BAR_GPA        0x10000000                /* in virt's 32-bit PCI MMIO window */
#define BAR_PAGES      4
#define READY_WORD     0x5944414552544b76        /* "vKTREADY" */
#define GO_WORD        0x0000004f47544b76        /* "vKTGO" */
#define DATA2_BASE     0x42000000
#define PHASE2_PAGES   32
#define TIMEOUT_S      1500                      /* record --pid compiles for minutes under TCG */
#define PSCI_SYSTEM_OFF 0x84000008

    .text
    .global _start
_start:
    // 1. RAM pages
    ldr     x0, =DATA_BASE
    mov     x1, #PAYLOAD_PAGES
    ldr     x2, =0x6b76706167650000          // "kvpage" tag | page index
1:  orr     x3, x2, x1
    str     x3, [x0]
    add     x0, x0, #0x1000
    subs    x1, x1, #1
    b.ne    1b

    // 2. ivshmem BAR2 through ECAM
    ldr     x4, =IVSHMEM_CFG
    ldr     w5, [x4]                           // vendor/device id
    ldr     w6, =IVSHMEM_ID
    cmp     w5, w6
    b.ne    off                                // no ivshmem at 00:01.0: power off
    ldr     w5, =BAR_GPA
    str     w5, [x4, #0x18]                    // BAR2 low (64-bit prefetchable BAR)
    str     wzr, [x4, #0x1c]                   // BAR2 high
    mov     w5, #2                             // command: memory space enable
    str     w5, [x4, #4]

    // 3. BAR pages, then READY
    ldr     x0, =BAR_GPA
    mov     x1, #BAR_PAGES
    ldr     x2, =0x6b76626172000000          // "kvbar" tag | page index
2:  orr     x3, x2, x1
    str     x3, [x0, #16]
    add     x0, x0, #0x1000
    subs    x1, x1, #1
    b.ne    2b
    ldr     x0, =BAR_GPA
    ldr     x3, =READY_WORD
    str     x3, [x0]

    // 4. wait for GO (or the timeout)
    mrs     x7, cntfrq_el0
    mov     x8, #TIMEOUT_S
    mul     x7, x7, x8
    isb
    mrs     x8, cntvct_el0
    add     x7, x7, x8                         // deadline
    ldr     x3, =GO_WORD
3:  ldr     x9, [x0, #8]
    cmp     x9, x3
    b.eq    5f
    isb
    mrs     x8, cntvct_el0
    cmp     x8, x7
    b.lo    3b
    b       off

    // 5. phase 2: RAM pages written after GO
5:  ldr     x0, =DATA2_BASE
    mov     x1, #PHASE2_PAGES
    ldr     x2, =0x6b76706832000000          // "kvph2" tag | page index
6:  orr     x3, x2, x1
    str     x3, [x0]
    add     x0, x0, #0x1000
    subs    x1, x1, #1
    b.ne    6b

    // 6. power off
off:
    ldr     x0, =PSCI_SYSTEM_OFF
    hvc     #0
4:  wfi
    b       4b
    .ltorg
