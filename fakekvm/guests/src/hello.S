/*
 * hello -- real-mode guest: prints a line on the serial port and halts.
 *
 * Loaded at LOAD (0x7c00) with CS = DS = 0 (base 0), entered at its first byte.
 * Writes "Hello from fakekvm\n" one byte at a time with `outb %al, %dx` to port
 * 0x3f8 (each one a KVM_EXIT_IO: direction OUT, size 1, count 1), then executes
 * `hlt` (KVM_EXIT_HLT).  Position-dependent addresses are computed from LOAD as
 * assemble-time constants, so the object has no relocations and
 * `objcopy -O binary` gives the bytes to load.
 */
        .code16
        .text
        .set LOAD, 0x7c00
        .set PORT_TEXT, 0x3f8

        .globl _start
_start:
        cld
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    $(LOAD + message - _start), %si
        movw    $PORT_TEXT, %dx
1:      lodsb
        testb   %al, %al
        jz      2f
        outb    %al, %dx
        jmp     1b
2:      hlt
        jmp     2b

message:
        .asciz  "Hello from fakekvm\n"
