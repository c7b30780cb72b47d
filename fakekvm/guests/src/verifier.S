/*
 * verifier -- long mode, CPL3: checksum [base, base+size).
 *
 * In: rdi base, rsi size in bytes (multiple of 8).
 * The checksum is the little-endian integer formed by the whole range, taken
 * modulo the prime P = 2^64 - 59:  sum(w_i * 2^(64 i)) mod P over the qwords
 * w_i.  It is computed by Horner's rule from the top qword down, one `div` a
 * word:
 *     H <- (H * 2^64 + w_i) mod P
 * without a `div`: 2^64 = 59 (mod P), so H * 2^64 + w = H * 59 + w (mod P), one
 * 64x64->128 `mul` and two folds. (A `div` is a bit-by-bit helper loop on an
 * emulator -- about 10x the cost of this loop on unicorn -- and the same few
 * cycles natively.)
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
        movl    $59, %ecx               /* rcx = 2^64 mod P */
        movabsq $P_MOD, %r10            /* r10 = P */
        shrq    $3, %rsi                /* rsi = words left */
        xorl    %r9d, %r9d              /* r9 = H, always < P */
        leaq    (%rdi,%rsi,8), %r8      /* r8 = end */
1:      testq   %rsi, %rsi
        jz      2f
        subq    $8, %r8
        movq    %r9, %rax
        mulq    %rcx                    /* rdx:rax = H * 59 (rdx < 59) */
        addq    (%r8), %rax
        adcq    $0, %rdx                /* rdx:rax = H * 59 + w */
        imulq   $59, %rdx, %rdx         /* fold the high word: rdx * 2^64 = rdx * 59 */
        addq    %rdx, %rax
        jnc     3f
        addq    $59, %rax               /* a carry out is 2^64 = 59; rax < 59*59 now: no new carry */
3:      cmpq    %r10, %rax
        jb      4f
        subq    %r10, %rax              /* rax < 2^64 = P + 59: one subtraction reduces */
4:      movq    %rax, %r9
        decq    %rsi
        jmp     1b
2:      REPORT64 %r9
        DONE    DONE_OK
