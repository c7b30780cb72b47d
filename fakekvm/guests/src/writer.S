/*
 * writer -- long mode, CPL3: fill [base, base+size) with the seeded pattern.
 *
 * In: rdi base (page aligned), rsi size in bytes (page multiple), rdx seed.
 * The qword at address a (page p = a & ~0xfff, word j = (a >> 3) & 511) is
 *     mix64(seed ^ p) ^ (j * GOLDEN)            (mod 2^64)
 * where mix64 is the splitmix64 finaliser (>>30, *0xbf58476d1ce4e5b9, >>27,
 * *0x94d049bb133111eb, >>31).  Every word depends on the seed, its page and
 * its place in the page.  fakekvm/guests/workloads.py:pattern_bytes mirrors it.
 * Out: REPORT pages written (32 bit), DONE 0.
 */
        .code64
        .text
        .include "ports.inc"
        .set GOLDEN, 0x9e3779b97f4a7c15
        .set MIX1,   0xbf58476d1ce4e5b9
        .set MIX2,   0x94d049bb133111eb

        .globl _start
_start:
        movq    %rsi, %r14
        shrq    $12, %r14               /* r14 = pages left */
        xorl    %ebx, %ebx              /* rbx = pages written */
        movabsq $GOLDEN, %r13
        movabsq $MIX1, %r11
        movabsq $MIX2, %r12
1:      cmpq    %r14, %rbx
        jae     3f
        movq    %rbx, %rsi
        shlq    $12, %rsi
        addq    %rdi, %rsi              /* rsi = page address */
        movq    %rdx, %rax
        xorq    %rsi, %rax              /* mix64(seed ^ page) */
        movq    %rax, %rcx
        shrq    $30, %rcx
        xorq    %rcx, %rax
        imulq   %r11, %rax
        movq    %rax, %rcx
        shrq    $27, %rcx
        xorq    %rcx, %rax
        imulq   %r12, %rax
        movq    %rax, %rcx
        shrq    $31, %rcx
        xorq    %rcx, %rax              /* rax = page key */
        xorl    %ecx, %ecx              /* rcx = j * GOLDEN */
        movl    $512, %r8d
2:      movq    %rax, %r9
        xorq    %rcx, %r9
        movq    %r9, (%rsi)
        addq    $8, %rsi
        addq    %r13, %rcx
        decl    %r8d
        jnz     2b
        incq    %rbx
        jmp     1b
3:      movl    %ebx, %eax
        REPORT32
        DONE    DONE_OK
