/*
 * echo -- long mode, CPL3: exercises IN exits.
 *
 * Loop: IN a 32-bit value from PORT_INPUT (the VMM supplies it, KVM_EXIT_IO
 * direction IN); if it is 0, DONE 0; else REPORT value + 1 and write one '.'
 * to PORT_TEXT.  No parameters.
 */
        .code64
        .text
        .include "ports.inc"

        .globl _start
_start:
1:      movw    $PORT_INPUT, %dx
        inl     %dx, %eax
        testl   %eax, %eax
        jz      2f
        incl    %eax
        REPORT32
        movb    $'.', %al
        movw    $PORT_TEXT, %dx
        outb    %al, %dx
        jmp     1b
2:      DONE    DONE_OK
