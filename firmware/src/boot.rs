//! Ring-0 boot path, in assembly only: PVH entry (32-bit protected mode) to
//! 64-bit long mode, then `iretq` to CPL3 where all Rust code runs.
//!
//! Under PVM every ring-0 instruction is emulated (~0.6 µs each), so this path
//! is kept to 30 instructions: the page tables, GDT, TSS (with its I/O
//! bitmap), IDT and the `iretq` frame are complete at link time (see
//! `link.ld` for the descriptor fields the linker computes) and the code only
//! loads them.
//!
//! Machine state handed to Rust (`main(start_info)` in `main.rs`):
//! - 64-bit mode, CPL3, CS = 0x33, SS = DS = ES = FS = GS = 0x2b.
//! - RFLAGS = 0x3202: IOPL 3, IF = 1, DF = 0. Interrupts are taken at CPL3
//!   (checked under PVM: a self-IPI reached the ring-0 stub and the guest went
//!   on), but nothing raises one until Rust code enables the local APIC: both
//!   8259 PICs are masked here, and the APIC starts software-disabled.
//! - Port I/O at CPL3 is allowed twice over: by IOPL 3 and by an all-zero
//!   I/O permission bitmap in the TSS. PVM needs the bitmap: it runs CPL3
//!   code with the hardware IOPL at 0 (`pushfq` there shows IOPL 0) and
//!   emulates a trapped `in`/`out` only if the TSS bitmap permits the port;
//!   otherwise the guest gets #GP.
//! - Identity map of 0–4 GiB with 2 MiB pages, all present | writable | user,
//!   write-back (covers RAM below 4 GiB and the 3–4 GiB PCI MMIO hole).
//! - CR0.MP = 1, CR0.EM = 0, CR4.OSFXSR = CR4.OSXMMEXCPT = 1: SSE works.
//! - TSS.rsp0 = top of a 16 KiB ring-0 stack; IDT vectors 0–31 write
//!   128 + vector to the debug-exit port 0xf4 and halt. (PVM was expected to
//!   kill the guest on any exception at CPL3; on our hosts #UD, #PF, #DE, #BP
//!   and #GP taken at CPL3 did reach these stubs.) Vectors 32–255 count the
//!   interrupt in `boot_irq_counts[vector]` (u32, readable at CPL3), write the
//!   local APIC EOI register and `iretq`: 7 plain integer instructions.
//! - All gates have DPL 0: under PVM `int n` at CPL3 raises #UD whatever the
//!   gate's DPL, so there is no software entry to ring 0.
//! - `.bss` zeroed (by the CPL3 entry stub, natively), 64 KiB user stack.
//!
//! GDT selectors: the Linux x86-64 layout, which is also SYSCALL/SYSRET
//! compatible (STAR is set to match). PVM requires it: guest CPL3 code runs
//! on the host's user segments, and an `iretq` to CPL3 with any user CS/SS
//! other than Linux's `__USER_CS` (0x33) / `__USER_DS` (0x2b) takes #GP.
//! 0x08 kernel code32 (unused), 0x10 kernel code64, 0x18 kernel data,
//! 0x20 user code32 (0x23, unused), 0x28 user data (0x2b), 0x30 user code64
//! (0x33), 0x40 64-bit TSS.

/// I/O port of the debug-exit device: a byte written here ends the VM with
/// that status (Tessera, and QEMU's `isa-debug-exit` as `(v << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Exit status base of the exception stubs: status = 128 + vector.
pub const EXCEPTION_EXIT_BASE: u8 = 128;

core::arch::global_asm!(
    r#"
/* ------------------------------------------------------------------ */
/* PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen".         */
/* The descriptor is 8 bytes (the entry address zero-extended): 32-bit  */
/* readers use the low half, 64-bit readers get the same value.        */
/* ------------------------------------------------------------------ */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                     /* n_namesz: "Xen\0" */
    .long 8                     /* n_descsz */
    .long 18                    /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection

/* ------------------------------------------------------------------ */
/* Entry: 32-bit protected mode, paging off, %ebx = hvm_start_info.    */
/* ------------------------------------------------------------------ */
    .pushsection .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    lgdt boot_gdt_ptr
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0x620, %eax           /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xc0000080, %ecx      /* IA32_EFER */
    movl $0x100, %eax           /* LME */
    xorl %edx, %edx
    wrmsr
    movl $0x80000033, %eax      /* CR0: PG | NE | ET | MP | PE (EM, TS clear) */
    movl %eax, %cr0
    ljmp $0x10, $boot_start64

    .code64
boot_start64:
    movl $0x2b, %eax            /* user data selector for DS/ES/FS/GS */
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movl $0x40, %eax
    ltr %ax
    lidt boot_idt_ptr(%rip)
    movl $0xc0000081, %ecx      /* IA32_STAR: kernel CS 0x10, user base 0x23 */
    xorl %eax, %eax
    movl $0x00230010, %edx
    wrmsr
    movb $0xff, %al             /* mask every line of both 8259 PICs: */
    outb %al, $0x21             /* user code runs with IF = 1 and an */
    outb %al, $0xa1             /* unprogrammed PIC would use vectors 0-15 */
    movl %ebx, %edi             /* start_info (zero-extended) for main */
    movl $boot_iret_frame, %esp
    iretq                       /* to boot_user_entry at CPL3 */

/* ------------------------------------------------------------------ */
/* First CPL3 code (native speed): zero .bss, then call Rust main.     */
/* ------------------------------------------------------------------ */
    .globl boot_user_entry
boot_user_entry:
    movq %rdi, %rdx
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb                   /* the stack is in .bss and still unused */
    movq %rdx, %rdi
    call main                   /* never returns */
1:  pause
    jmp 1b
    .popsection

/* ------------------------------------------------------------------ */
/* Interrupt stubs: one 16-byte slot per vector 0-255.                 */
/* 0-31 (exceptions): write 128 + vector to the debug-exit port, halt. */
/* 32-255: count the interrupt, EOI the local APIC, return.            */
/* ------------------------------------------------------------------ */
    .pushsection .text.boot.isr, "ax"
    .balign 4096
    .globl boot_isr_stubs
boot_isr_stubs:
    .set boot_vec, 0
    .rept 256
    .org boot_isr_stubs + boot_vec * 16
    .if boot_vec < 32
    movb $(128 + boot_vec), %al
    outb %al, $0xf4
2:  hlt
    jmp 2b
    .else
    incl boot_irq_counts + 4 * boot_vec(%rip)
    jmp boot_irq_common
    .endif
    .set boot_vec, boot_vec + 1
    .endr
    .org boot_isr_stubs + 256 * 16
boot_irq_common:
    pushq %rax
    movl $0xfee000b0, %eax      /* local APIC EOI register */
    movl $0, (%rax)
    popq %rax
    iretq
    .popsection

/* ------------------------------------------------------------------ */
/* Page tables: identity map 0-4 GiB with 2 MiB pages, built at link   */
/* time. Flags: P | RW | US (0x7), PS (0x80) on the 2 MiB leaves.      */
/* ------------------------------------------------------------------ */
    .pushsection .data.boot.pagetables, "aw"
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0000 + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set boot_page, 0
    .rept 2048
    .quad (boot_page << 21) | 0x87
    .set boot_page, boot_page + 1
    .endr
    .popsection

/* ------------------------------------------------------------------ */
/* GDT, TSS, IDT and the iretq frame.                                  */
/* ------------------------------------------------------------------ */
    .pushsection .data.boot, "aw"
    .balign 16
boot_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00cf9a000000ffff    /* 0x08 kernel code32, DPL 0 (unused) */
    .quad 0x00af9a000000ffff    /* 0x10 kernel code64, DPL 0 */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data, DPL 0 */
    .quad 0x00cffa000000ffff    /* 0x20 user code32, DPL 3 (unused) */
    .quad 0x00cff2000000ffff    /* 0x28 user data, DPL 3 */
    .quad 0x00affa000000ffff    /* 0x30 user code64, DPL 3 */
    .quad 0                     /* 0x38 unused */
    .word 0x67 + 8193           /* 0x40 64-bit TSS: limit incl. I/O bitmap */
    .word __tss_base_15_0
    .byte __tss_base_23_16
    .byte 0x89                  /* present, DPL 0, available 64-bit TSS */
    .byte 0x00
    .byte __tss_base_31_24
    .long 0                     /* base 63:32 (image is below 4 GiB) */
    .long 0
boot_gdt_end:

    .balign 8
    .word 0, 0, 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .balign 8
    .word 0, 0, 0
boot_idt_ptr:
    .word 256 * 16 - 1
    .quad boot_idt

    .balign 16
    .globl boot_tss
boot_tss:
    .long 0                     /* reserved */
    .quad boot_ring0_stack_top  /* rsp0 */
    .quad 0, 0                  /* rsp1, rsp2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* ist1-ist7 */
    .quad 0                     /* reserved */
    .word 0                     /* reserved */
    .word 104                   /* I/O map base: the bitmap that follows */
    .fill 8192, 1, 0            /* I/O permission bitmap: every port allowed */
    .byte 0xff                  /* required terminator byte */

    .balign 16
boot_idt:
    .set boot_vec, 0
    .rept 256
    .word __isr_stubs_15_0 + boot_vec * 16
    .word 0x10                  /* kernel code64 */
    .byte 0                     /* no IST */
    .byte 0x8e                  /* present, DPL 0, 64-bit interrupt gate */
    .word __isr_stubs_31_16
    .long 0                     /* offset 63:32 */
    .long 0
    .set boot_vec, boot_vec + 1
    .endr

    /* Ring-0 stack for the few instructions before iretq (only an      */
    /* exception there would use it), then the iretq frame.            */
    .balign 16
    .fill 64, 8, 0
boot_iret_frame:
    .quad boot_user_entry       /* RIP */
    .quad 0x33                  /* CS: user code64 | RPL 3 */
    .quad 0x3202                /* RFLAGS: IOPL 3, IF 1, bit 1 */
    .quad boot_user_stack_top   /* RSP (16-byte aligned) */
    .quad 0x2b                  /* SS: user data | RPL 3 */
    .popsection

/* ------------------------------------------------------------------ */
/* Stacks (zero-initialized).                                          */
/* ------------------------------------------------------------------ */
    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_ring0_stack:
    .skip 16384
boot_ring0_stack_top:
    .globl boot_irq_counts
boot_irq_counts:                /* u32 per vector, written by the stubs */
    .skip 1024
    .globl boot_user_stack
boot_user_stack:
    .skip 65536
    .globl boot_user_stack_top
boot_user_stack_top:
    .popsection
"#,
    options(att_syntax)
);
