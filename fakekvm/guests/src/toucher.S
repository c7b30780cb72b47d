/*
 * toucher -- long mode, CPL3: touch pages of [base, base+size) in a chosen order.
 *
 * In (registers, set by the VMM through KVM_SET_REGS):
 *   rdi  base (page aligned guest address)        rsi  size in bytes (page multiple)
 *   rdx  seed                                     rcx  pattern: 0 SEQUENTIAL, 1 STRIDED,
 *   r8   flags: bit 0 WRITE                                    2 RANDOM, 3 HOTSET
 *   r9   stride in pages (STRIDED; 0 means 1)     r10  touches (HOTSET; 0 means npages)
 *   r12  hot pages (HOTSET; 0 means max(1, npages/16))   r13  hot percent (HOTSET)
 *
 * One touch of page i reads the qword at base + i*4096 into a 64-bit sum or,
 * with WRITE, stores there the value (seed << 32) | i and adds it to the sum.
 *   SEQUENTIAL  i = 0, 1, ..., npages-1
 *   STRIDED     for s in 0..stride-1: i = s, s+stride, s+2*stride, ...   (every page once)
 *   RANDOM      a seeded permutation of 0..npages-1: with k = bits(npages-1),
 *               x <- (A*x + 2*seed+1) mod 2^k (full period, Hull-Dobell), x0 = seed mod 2^k,
 *               i = x ^ (x >> (k/2 + 1)), skipped when i >= npages
 *   HOTSET      `touches` times: x <- xorshift64(x) (13, 7, 17), x0 = seed ^ GOLDEN (1 if 0);
 *               i = (x mod 2^32) mod (hot if (x >> 32) mod 100 < percent else npages)
 * Out: REPORT touch count (32 bit), REPORT sum low, REPORT sum high, DONE 0
 * (DONE 2 for an unknown pattern).  fakekvm/guests/workloads.py mirrors all of it.
 */
        .code64
        .text
        .include "ports.inc"
        .set A_LCG,  0x5851f42d4c957f2d
        .set GOLDEN, 0x9e3779b97f4a7c15

        .globl _start
_start:
        movq    %rsi, %r14
        shrq    $12, %r14               /* r14 = npages */
        movq    %r8, %r15               /* r15 = flags */
        movq    %rdx, %r8               /* r8  = seed */
        movq    %rdx, %r11
        shlq    $32, %r11               /* r11 = write tag = seed << 32 */
        xorl    %ebx, %ebx              /* rbx = touch count */
        xorl    %ebp, %ebp              /* rbp = sum */
        testq   %r14, %r14
        jz      report
        cmpq    $0, %rcx
        je      sequential
        cmpq    $1, %rcx
        je      strided
        cmpq    $2, %rcx
        je      random
        cmpq    $3, %rcx
        je      hotset
        DONE    DONE_BAD_PARAM

sequential:
        xorl    %esi, %esi
1:      cmpq    %r14, %rsi
        jae     report
        movq    %rsi, %rax
        call    touch
        incq    %rsi
        jmp     1b

strided:
        testq   %r9, %r9
        jnz     1f
        movl    $1, %r9d
1:      cmpq    %r14, %r9
        cmova   %r14, %r9               /* stride = min(stride, npages) */
        xorl    %edx, %edx              /* rdx = start */
2:      cmpq    %r9, %rdx
        jae     report
        movq    %rdx, %rsi
3:      cmpq    %r14, %rsi
        jae     4f
        movq    %rsi, %rax
        call    touch
        addq    %r9, %rsi
        jmp     3b
4:      incq    %rdx
        jmp     2b

random:
        xorl    %ecx, %ecx              /* rcx = k */
        cmpq    $1, %r14
        jbe     1f
        leaq    -1(%r14), %rax
        bsrq    %rax, %rcx
        incq    %rcx
1:      movl    $1, %r10d
        shlq    %cl, %r10               /* r10 = 2^k steps left */
        leaq    -1(%r10), %r12          /* r12 = mask */
        movq    %rcx, %r13
        shrq    $1, %r13
        incq    %r13                    /* r13 = k/2 + 1 */
        movabsq $A_LCG, %r9             /* r9  = multiplier */
        leaq    1(%r8,%r8), %rdx        /* rdx = increment 2*seed+1 */
        movq    %r8, %rsi
        andq    %r12, %rsi              /* rsi = x */
2:      testq   %r10, %r10
        jz      report
        decq    %r10
        movq    %rsi, %rax
        imulq   %r9, %rax
        addq    %rdx, %rax
        andq    %r12, %rax
        movq    %rax, %rsi              /* x = (A*x + c) mod 2^k */
        movq    %r13, %rcx
        shrq    %cl, %rax
        xorq    %rsi, %rax              /* i = x ^ (x >> s) */
        cmpq    %r14, %rax
        jae     2b
        call    touch
        jmp     2b

hotset:
        testq   %r10, %r10
        jnz     1f
        movq    %r14, %r10              /* touches = npages */
1:      testq   %r12, %r12
        jnz     2f
        movq    %r14, %r12
        shrq    $4, %r12                /* hot = npages / 16 */
        jnz     2f
        movl    $1, %r12d               /* ... at least 1 */
2:      cmpq    %r14, %r12
        cmova   %r14, %r12              /* hot = min(hot, npages) */
        movabsq $GOLDEN, %rsi
        xorq    %r8, %rsi               /* x = seed ^ GOLDEN */
        jnz     3f
        movl    $1, %esi
3:      testq   %r10, %r10
        jz      report
        decq    %r10
        movq    %rsi, %rax
        shlq    $13, %rax
        xorq    %rax, %rsi
        movq    %rsi, %rax
        shrq    $7, %rax
        xorq    %rax, %rsi
        movq    %rsi, %rax
        shlq    $17, %rax
        xorq    %rax, %rsi              /* x = xorshift64(x) */
        movq    %rsi, %rax
        shrq    $32, %rax
        xorl    %edx, %edx
        movl    $100, %ecx
        divq    %rcx                    /* rdx = (x >> 32) mod 100 */
        movq    %r14, %rcx
        cmpq    %r13, %rdx
        cmovb   %r12, %rcx              /* modulus = hot if rdx < percent else npages */
        movl    %esi, %eax
        xorl    %edx, %edx
        divq    %rcx
        movq    %rdx, %rax              /* i = (x mod 2^32) mod modulus */
        call    touch
        jmp     3b

/* touch page %rax; clobbers %rax, %rcx */
touch:
        movq    %rax, %rcx
        shlq    $12, %rcx
        addq    %rdi, %rcx
        testb   $1, %r15b
        jnz     1f
        addq    (%rcx), %rbp
        incq    %rbx
        ret
1:      orq     %r11, %rax
        movq    %rax, (%rcx)
        addq    %rax, %rbp
        incq    %rbx
        ret

report:
        movl    %ebx, %eax
        REPORT32
        REPORT64 %rbp
        DONE    DONE_OK
