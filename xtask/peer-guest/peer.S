# The peer benchmark's QEMU guest (`cargo xtask bench --only peer`): a 64 KiB
# firmware image that QEMU runs in place of SeaBIOS (`-bios`), so the VM needs
# no BIOS POST (about 2 s under PVM; this image boots in under 0.1 s).
#
# From the reset vector it enables A20, enters 32-bit protected mode (flat
# segments, no paging: the benchmark's guests are at most 1 GiB, all below
# 4 GiB), reads the RAM size from the CMOS (what QEMU's pc machine stores at
# 0x34/0x35: 64 KiB units above 16 MiB), then
#   1. writes every page of RAM it can reach, [0, 0xA0000) and [1 MiB, top),
#      with a non-zero word (the page's address | 0x5a) at its start, so that
#      no page is a zero page for the migration (QEMU and pcft alike send a
#      page whole unless all of it is zero). One word per page, not all 1,024:
#      under PVM every guest instruction is emulated, and filling whole pages
#      takes 80 s for 1 GiB where this takes 4 s;
#   2. sends 'F' on the first serial port (0x3f8): the fill is done;
#   3. writes pages above 1 MiB at random (xorshift32) as fast as it can, so
#      that post-copy has demand faults. It never stops.
# It uses no stack and no memory of its own. Build: `as --32`, `ld -m elf_i386
# -Ttext=0`, `objcopy -O binary` (xtask/src/bench_peer/qemu.rs does it).

.set SERIAL, 0x3f8
.set ROM_BASE, 0xf0000           # where QEMU maps this image below 1 MiB
.set LOW_RAM_END, 0xa0000        # the VGA hole starts here
.set HIGH_RAM, 0x100000

.section .text
.code16
entry16:
    cli
    inb $0x92, %al              # fast A20 gate on
    orb $2, %al
    andb $0xfe, %al
    outb %al, $0x92
    mov %cs, %ax                # cs = 0xf000: offsets in this image
    mov %ax, %ds
    lgdtl gdt_desc
    mov %cr0, %eax
    or $1, %eax                 # protected mode
    mov %eax, %cr0
    ljmpl $0x08, $(ROM_BASE + entry32)

.code32
entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x35, %al              # ebx = top of RAM = CMOS[0x35:0x34] * 64 KiB + 16 MiB
    outb %al, $0x70
    inb $0x71, %al
    movzbl %al, %ebx
    shl $8, %ebx
    mov $0x34, %al
    outb %al, $0x70
    inb $0x71, %al
    mov %al, %bl
    shl $16, %ebx
    add $0x1000000, %ebx

    xor %esi, %esi              # 1. fill [0, LOW_RAM_END), then [HIGH_RAM, ebx)
    mov $LOW_RAM_END, %ebp
fill:
    mov %esi, %eax
    or $0x5a, %eax
    mov %eax, (%esi)
    add $4096, %esi
    cmp %ebp, %esi
    jb fill
    cmp %ebx, %ebp
    je filled
    mov $HIGH_RAM, %esi
    mov %ebx, %ebp
    jmp fill

filled:
    mov $SERIAL, %dx            # 2. tell the host
    mov $'F', %al
    outb %al, %dx

    sub $HIGH_RAM, %ebx         # 3. random writes: ebx = pages above 1 MiB
    shr $12, %ebx
    mov $0x2545f491, %esi       # xorshift32 state
    xor %edi, %edi              # write counter
random:
    mov %esi, %eax
    shl $13, %eax
    xor %eax, %esi
    mov %esi, %eax
    shr $17, %eax
    xor %eax, %esi
    mov %esi, %eax
    shl $5, %eax
    xor %eax, %esi
    mov %esi, %eax
    mul %ebx                    # edx = page index below ebx
    shl $12, %edx
    inc %edi
    mov %edi, HIGH_RAM + 8(%edx)
    jmp random

.align 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    # 0x08: code, flat 4 GiB
    .quad 0x00cf93000000ffff    # 0x10: data, flat 4 GiB
gdt_desc:
    .word gdt_desc - gdt - 1
    .long ROM_BASE + gdt

.org 0xfff0                     # the reset vector, 16 bytes below the top
.code16
    ljmp $0xf000, $entry16
.org 0x10000
