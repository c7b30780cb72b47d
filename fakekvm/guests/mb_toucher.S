/*
 * mb_toucher -- a multiboot kernel for QEMU: fill RAM, wait for the go signal,
 * touch every page of RAM above 2 MiB at CPL3 and time each touch with rdtsc.
 *
 * Boot: QEMU's -kernel multiboot loader (Multiboot spec 0.6.96 §3.1, the
 * "a.out kludge": flag bit 16, so the flat binary says where it loads) enters
 * entry32 in 32-bit protected mode, paging off, EBX = multiboot info.  The
 * image is position-dependent (loaded at LOAD) and has no relocations: every
 * absolute address is LOAD + (label - _start) or a fixed low-memory address.
 *
 * Command line (QEMU -append; the loader passes "FILE ARGS"):  "... @M[SEED]"
 *   M = i idle (touch nothing), s sequential, r random;  SEED decimal (default 0).
 *
 * Guest code at CPL0 runs in KVM's instruction emulator on kvm-pvm (~0.5 us an
 * instruction) and kvm-pvm does not deliver an interrupt or exception from
 * CPL3 through this IDT (it shuts the guest down), so CPL0 only sets up and
 * everything after runs at 64-bit CPL3, natively, never returning to CPL0:
 *   CPL0  page tables (4 GiB identity, 2 MiB pages, U/S set), long mode, a TSS
 *         with an all-zero I/O bitmap (port I/O allowed at CPL3: kvm-pvm keeps
 *         IOPL 0), an empty IDT, then iretq to CPL3 with IF 0.
 *   CPL3  prints "B\n"; fills one qword of every page of [2 MiB, mem_end) so no
 *         page is zero (QEMU sends a zero page as a flag, not a page); prints
 *         "F\n"; then spins reading port 0xe9 until it reads GO ('G').  QEMU's
 *         isa-debugcon answers reads with its `readback` property: the
 *         harness gives the destination readback=GO and the source the
 *         default, so the touches start the instant the guest resumes on the
 *         destination -- as fakekvm's engine starts its workload.
 *         (Each read is an exit to QEMU: the source's vCPU thread spins until
 *         the source stops, as the guest it stands for would run.)
 *   CPL3  prints "G mem_end\n" (hex; mem_end = 1 MiB + the multiboot info's
 *         mem_upper: SeaBIOS's e820 keeps the top 128 KiB of -m here) and
 *         touches every data page in the workload's order: write
 *         (seed << 32 | i) at page i, timed by lfence;rdtsc around the store.  A 256-bucket histogram of the cycles (quarter octaves: bucket
 *         4*b + the two bits after the top bit b, for b >= 2; values < 4 in
 *         buckets 0..3) is kept at HIST.  Prints "H idx count\n" (hex) per
 *         non-empty bucket, then "D touches sum\n" (hex), then executes hlt at
 *         CPL3: #GP with no IDT -> triple fault -> QEMU's shutdown action
 *         (the harness runs with -action shutdown=pause: the vCPU stops, the
 *         migration goes on).
 * RANDOM is the toucher's permutation (src/toucher.S): k = bits(npages-1),
 * x <- (A*x + 2*seed+1) mod 2^k, x0 = seed mod 2^k, i = x ^ (x >> (k/2+1)),
 * skipped when i >= npages.  Output goes to QEMU's debugcon (port 0xe9).
 * tools/bench_qemu.py drives it; tools/build_guests.py builds it.
 */
        .set LOAD,      0x100000        /* where the loader puts the file */
        .set MBI_SAVE,  0x6f000         /* the multiboot info pointer, saved */
        .set MODE,      0x6f010         /* 'i', 's', 'r' */
        .set SEED,      0x6f018
        .set MEM_END,   0x6f020
        .set TSS,       0x68000         /* 0x68 bytes + 8 KiB I/O bitmap + 0xff */
        .set HIST,      0x60000         /* 256 x u32 */
        .set PML4,      0x70000
        .set PDPT,      0x71000
        .set PD,        0x72000         /* 4 pages: 4 GiB of 2 MiB pages */
        .set STACK0,    0x80000         /* CPL0 stack top */
        .set STACK3,    0x90000         /* CPL3 stack top */
        .set DATA_BASE, 0x200000
        .set PORT,      0xe9            /* isa-debugcon */
        .set GO,        0x47            /* 'G': the destination's readback */
        .set A_LCG,     0x5851f42d4c957f2d
        .set MB_MAGIC,  0x1badb002
        .set MB_FLAGS,  0x00010002      /* memory info + address fields */
        .set RFLAGS3,   0x0002          /* IF 0 */

        .text
        .code32
        .globl _start
_start:
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
        .long   LOAD + (mb_header - _start)     /* header_addr */
        .long   LOAD                            /* load_addr */
        .long   LOAD + (image_end - _start)     /* load_end_addr */
        .long   LOAD + (image_end - _start)     /* bss_end_addr: no bss */
        .long   LOAD + (entry32 - _start)       /* entry_addr */

        .balign 8
gdt:
        .quad   0                               /* 0x00 null */
        .quad   0x00af9a000000ffff              /* 0x08 code64 DPL0 */
        .quad   0x00cf92000000ffff              /* 0x10 data DPL0 */
        .quad   0x00cff2000000ffff              /* 0x18 data DPL3 */
        .quad   0x00affa000000ffff              /* 0x20 code64 DPL3 */
        .quad   0x0000890680002068              /* 0x28 TSS at 0x68000, limit 0x2068 */
        .quad   0
gdt_end:
gdtr:
        .word   gdt_end - gdt - 1
        .long   LOAD + (gdt - _start)
idtr:
        .word   0
        .quad   0

entry32:
        cli
        movl    %ebx, MBI_SAVE
        lgdt    LOAD + (gdtr - _start)
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $STACK0, %esp
        /* zero PML4 + PDPT */
        movl    $PML4, %edi
        xorl    %eax, %eax
        movl    $2048, %ecx
        cld
        rep stosl
        movl    $(PDPT + 7), PML4
        movl    $(PD + 7), PDPT
        movl    $(PD + 0x1000 + 7), PDPT + 8
        movl    $(PD + 0x2000 + 7), PDPT + 16
        movl    $(PD + 0x3000 + 7), PDPT + 24
        /* 2048 PD entries: i * 2 MiB | P RW US PS */
        movl    $PD, %edi
        movl    $0x87, %eax
        movl    $2048, %ecx
1:      movl    %eax, (%edi)
        movl    $0, 4(%edi)
        addl    $0x200000, %eax
        addl    $8, %edi
        decl    %ecx
        jnz     1b
        movl    %cr4, %eax
        orl     $0x20, %eax                     /* PAE */
        movl    %eax, %cr4
        movl    $PML4, %eax
        movl    %eax, %cr3
        movl    $0xc0000080, %ecx               /* EFER */
        rdmsr
        orl     $0x100, %eax                    /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax               /* PG | PE */
        movl    %eax, %cr0
        ljmp    $0x08, $(LOAD + (entry64 - _start))

        .code64
entry64:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movq    $STACK0, %rsp
        /* TSS: RSP0 and an I/O bitmap of zeros (every port allowed at CPL3;
           kvm-pvm keeps IOPL at 0 whatever iretq loads) + the 0xff terminator */
        movq    $TSS, %rdi
        xorl    %eax, %eax
        movl    $(13 + 1024 + 1), %ecx
        rep stosq
        movq    $STACK0, %rax
        movq    %rax, TSS + 4
        movw    $104, TSS + 102
        movb    $0xff, TSS + 104 + 8192
        movw    $0x28, %ax
        ltr     %ax
        lidt    idtr(%rip)                      /* limit 0: any exception shuts down */
        /* HIST: zero */
        movq    $HIST, %rdi
        xorl    %eax, %eax
        movl    $128, %ecx
        rep stosq
        /* mem_end = 1 MiB + mem_upper KiB, page aligned, at most 4 GiB */
        movl    MBI_SAVE, %esi
        movl    8(%rsi), %eax
        shlq    $10, %rax
        addq    $0x100000, %rax
        andq    $-4096, %rax
        movabsq $0x100000000, %rcx
        cmpq    %rcx, %rax
        cmova   %rcx, %rax
        movq    %rax, MEM_END
        /* command line: "@M[SEED]" */
        movq    $'i', MODE
        movq    $0, SEED
        testl   $4, (%rsi)
        jz      3f
        movl    16(%rsi), %esi
1:      movb    (%rsi), %al
        testb   %al, %al
        jz      3f
        incq    %rsi
        cmpb    $'@', %al
        jne     1b
        movzbl  (%rsi), %eax
        movq    %rax, MODE
        incq    %rsi
        xorl    %edx, %edx
2:      movzbl  (%rsi), %eax
        subl    $'0', %eax
        cmpl    $9, %eax
        ja      4f
        imulq   $10, %rdx, %rdx
        addq    %rax, %rdx
        incq    %rsi
        jmp     2b
4:      movq    %rdx, SEED
3:      leaq    fill(%rip), %rax
        jmp     to_cpl3

/* iretq to CPL3 at %rax with a fresh user stack */
to_cpl3:
        movq    $STACK0, %rsp
        pushq   $0x1b
        pushq   $STACK3
        pushq   $RFLAGS3
        pushq   $0x23
        pushq   %rax
        iretq

/* ---- CPL3 ---------------------------------------------------------------- */

fill:
        movb    $'B', %al
        call    putc
        call    newline
        movq    MEM_END, %r14
        movq    $DATA_BASE, %rdi
        movabsq $0x5a5a000000000000, %rax
1:      cmpq    %r14, %rdi
        jae     2f
        movq    %rdi, %rcx
        orq     %rax, %rcx
        movq    %rcx, (%rdi)
        addq    $0x1000, %rdi
        jmp     1b
2:      movb    $'F', %al
        call    putc
        call    newline
        movw    $PORT, %dx
1:      inb     %dx, %al                        /* the source reads 0xe9, the destination GO */
        cmpb    $GO, %al
        jne     1b

touch_phase:
        movb    $'G', %al
        call    putc
        movq    MEM_END, %rax
        call    puthex
        call    newline
        movq    $DATA_BASE, %rdi
        movq    MEM_END, %r14
        subq    %rdi, %r14
        shrq    $12, %r14                       /* r14 = npages */
        movq    SEED, %r8
        movq    %r8, %r11
        shlq    $32, %r11                       /* r11 = write tag */
        xorl    %ebx, %ebx                      /* rbx = touches */
        xorl    %ebp, %ebp                      /* rbp = sum */
        movq    MODE, %rax
        cmpb    $'s', %al
        je      sequential
        cmpb    $'r', %al
        je      random
        jmp     report

sequential:
        xorl    %esi, %esi
1:      cmpq    %r14, %rsi
        jae     report
        movq    %rsi, %rax
        call    touch
        incq    %rsi
        jmp     1b

random:
        testq   %r14, %r14
        jz      report
        xorl    %ecx, %ecx                      /* rcx = k */
        cmpq    $1, %r14
        jbe     1f
        leaq    -1(%r14), %rax
        bsrq    %rax, %rcx
        incq    %rcx
1:      movl    $1, %r10d
        shlq    %cl, %r10                       /* r10 = 2^k steps left */
        leaq    -1(%r10), %r12                  /* r12 = mask */
        movq    %rcx, %r13
        shrq    $1, %r13
        incq    %r13                            /* r13 = k/2 + 1 */
        movabsq $A_LCG, %r9
        leaq    1(%r8,%r8), %r15                /* r15 = increment 2*seed+1 */
        movq    %r8, %rsi
        andq    %r12, %rsi                      /* rsi = x */
2:      testq   %r10, %r10
        jz      report
        decq    %r10
        movq    %rsi, %rax
        imulq   %r9, %rax
        addq    %r15, %rax
        andq    %r12, %rax
        movq    %rax, %rsi
        movq    %r13, %rcx
        shrq    %cl, %rax
        xorq    %rsi, %rax                      /* i = x ^ (x >> s) */
        cmpq    %r14, %rax
        jae     2b
        call    touch
        jmp     2b

/* touch page %rax: store (tag | i), timed; clobbers rax, rcx, rdx */
touch:
        movq    %rax, %rcx
        shlq    $12, %rcx
        addq    %rdi, %rcx                      /* rcx = address */
        orq     %r11, %rax                      /* rax = value */
        addq    %rax, %rbp
        incq    %rbx
        pushq   %rax
        pushq   %rcx
        lfence
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx                      /* rdx = t0 */
        popq    %rcx
        popq    %rax
        movq    %rax, (%rcx)                    /* the touch */
        movq    %rdx, %rcx
        lfence
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        subq    %rcx, %rax                      /* rax = cycles */
        cmpq    $4, %rax
        jb      1f
        bsrq    %rax, %rcx                      /* b >= 2 */
        subl    $2, %ecx
        shrq    %cl, %rax
        andl    $3, %eax                        /* the two bits after the top one */
        leal    8(%rax,%rcx,4), %eax            /* 4*b + q = 4*(b-2) + 8 + q */
1:      incl    HIST(,%rax,4)
        ret

report:
        xorl    %esi, %esi
1:      movl    HIST(,%rsi,4), %edx
        testl   %edx, %edx
        jz      2f
        movb    $'H', %al
        call    putc
        movq    %rsi, %rax
        call    puthex
        movl    HIST(,%rsi,4), %eax
        call    puthex
        call    newline
2:      incl    %esi
        cmpl    $256, %esi
        jb      1b
        movb    $'D', %al
        call    putc
        movq    %rbx, %rax
        call    puthex
        movq    %rbp, %rax
        call    puthex
        call    newline
        hlt                                     /* #GP at CPL3 -> triple fault -> shutdown */

/* output the byte in %al; clobbers %dx */
putc:
        movw    $PORT, %dx
        outb    %al, %dx
        ret

newline:
        movb    $'\n', %al
        jmp     putc

/* output " " and %rax in hex (no leading zeros); clobbers rax, rcx, rdx, r8, r9 */
puthex:
        movq    %rax, %r8
        movb    $' ', %al
        call    putc
        movl    $60, %ecx
        xorl    %r9d, %r9d                      /* r9 = a digit was printed */
1:      movq    %r8, %rax
        shrq    %cl, %rax
        andl    $15, %eax
        testl   %ecx, %ecx
        jz      2f                              /* always print the last digit */
        testl   %eax, %eax
        jnz     2f
        testl   %r9d, %r9d
        jz      3f
2:      movl    $1, %r9d
        cmpb    $10, %al
        jb      4f
        addb    $('a' - 10 - '0'), %al
4:      addb    $'0', %al
        call    putc
3:      subl    $4, %ecx
        jns     1b
        ret

image_end:
