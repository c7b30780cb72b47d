/*
 * verifier -- long mode, CPL3: checksum [base, base+size).
 *
 * In: rdi base, rsi size in bytes (multiple of 8).
 * The checksum is the little-endian integer formed by the whole range, taken
 * modulo the prime P = 2^64 - 59:  sum(w_i * 2^(64 i)) mod P over the qwords
 * w_i.  It is computed by Horner's rule from the top qword down, one `div` a
 * word (H < P keeps the quotient within 64 bits):
 *     H <- (H * 2^64 + w_i) mod P
 * It sees the position of every word, and in Python it is one line:
 *     int.from_bytes(buf, "little") % P          (fakekvm/guests/workloads.py:checksum)
 * Out: REPORT H low, REPORT H high, DONE 0.
 */
        .code64
        .text
        .include "ports.inc"
        .set P_MOD, 0xffffffffffffffc5

        .globl _start
_start:
        movabsq $P_MOD, %rcx
        shrq    $3, %rsi                /* rsi = words left */
        xorl    %edx, %edx              /* rdx = H */
        leaq    (%rdi,%rsi,8), %r8      /* r8 = end */
1:      testq   %rsi, %rsi
        jz      2f
        subq    $8, %r8
        movq    (%r8), %rax
        divq    %rcx                    /* rdx = (H * 2^64 + w) mod P */
        decq    %rsi
        jmp     1b
2:      REPORT64 %rdx
        DONE    DONE_OK
