; livemig demo guest: a flat 32-bit multiboot (v1) image.
;
; Boot (ring 0, emulated under PVM, so kept short), on every vCPU: load a
; GDT with 64-bit ring-0 and ring-3 segments and a TSS, take this vCPU's
; ring-0 stack, identity-map the low 4 GiB with user-accessible 2 MiB
; pages, enter long mode, read the parameter block and drop to ring 3 with
; IOPL=3. (PVM runs guest ring 3 natively only with long-mode paging.) Every
; vCPU loads its own TSS and the IDT; an idle one also starts its LAPIC
; timer at 100 Hz, its wake-up. With the devices flag, vCPU 0 also starts
; the PIT at 1 kHz through the PIC; its tiny ring-0 handler counts ticks in
; memory.
; (KVM's in-kernel PIT re-injects the ticks vCPU 0 could not take, while
; descheduled or paused, so the count keeps up with wall-clock time since
; the PIT started, where a LAPIC timer would lose them.)
; Workload (ring 3, native): vCPU i of N stamps pages i, i+N, i+2N, ... of
; the working set with the page index and its own generation, checking the
; previous generation's stamp first; it counts the pages it stamped in its
; own counter (so the VMM knows exactly where each vCPU stood at any stop)
; and reports progress, generations and mismatches with `out`. A vCPU with
; no pages idles as a real guest does: `int3` enters a three-instruction
; ring-0 path that halts until the next interrupt (so an idle
; vCPU leaves the host's CPU to others), and every idle_wakes wake-ups it
; reports progress 0. With the
; devices flag vCPU 0 also writes a running sequence of decimal numbers,
; one a line every LINE_TICKS ticks, to the serial port.
; See README.md for the parameter block, memory map and port map.

bits 32
org 0x100000

LOAD_ADDR       equ 0x100000

MB_MAGIC        equ 0x1BADB002
MB_FLAGS        equ 0x00010000          ; bit 16: a.out kludge address fields valid
MB_CHECKSUM     equ -(MB_MAGIC + MB_FLAGS)

PARAM_ADDR      equ 0x5000
PARAM_MAGIC     equ 0x50474D4C          ; "LMGP" little-endian
PARAM_VERSION   equ 3
MAX_VCPUS       equ 8                   ; a power of two (the index is masked)
FLAG_DEVICES    equ 1                   ; PIC, PIT and serial port present
FLAG_START_APS  equ 2                   ; only vCPU 0 was started: it wakes the others

PORT_BOOTED     equ 0x510
PORT_PROGRESS   equ 0x514
PORT_GENERATION equ 0x518
PORT_MISMATCH   equ 0x51C
COM1            equ 0x3F8

STAMPED_ADDR    equ 0x5100              ; u64 per vCPU, 64 bytes apart: pages stamped
STAMPED_STRIDE  equ 64
TICKS_ADDR      equ 0x5300              ; u64: timer interrupts taken
SERIAL_SEQ_ADDR equ 0x5308              ; u64: the next number the serial line carries
SERIAL_DUE_ADDR equ 0x5310              ; u64: the tick count at which it is due
LINE_TICKS      equ 5                   ; one line per 5 ms: 200 lines a second

STAMP_MAGIC     equ 0x47494D4C          ; "LMIG"
RING0_STACKS    equ 0x8000              ; vCPU i's stack tops at + 0x400 * (i + 1)
USER_STACKS     equ 0x7000              ; vCPU i's stack tops at - 0x100 * i
TSS_ADDR        equ 0xA000              ; vCPU i's TSS at + TSS_STRIDE * i
TSS_STRIDE      equ 0x80
TSS_BYTES       equ 0x68
IO_BITMAP       equ TSS_ADDR + TSS_STRIDE * MAX_VCPUS ; every TSS's I/O bitmap
IO_BITMAP_BYTES equ 0x2000              ; one bit per port, all clear: all open
PML4            equ 0x10000              ; then PDPT, then 4 page directories
PDPT            equ 0x11000
PDS             equ 0x12000

APIC_BASE       equ 0xFEE00000
APIC_SVR        equ 0x0F0
APIC_LVT0       equ 0x350
APIC_EOI        equ 0x0B0
APIC_LVT_TIMER  equ 0x320
APIC_TIMER_INIT equ 0x380               ; initial count
APIC_TIMER_DIV  equ 0x3E0               ; divide configuration
TIMER_PERIODIC  equ 0x20000             ; LVT timer mode bit 17
TIMER_DIVIDE_1  equ 0xB
WAKE_COUNT      equ 10000000            ; 10 ms at KVM's (and QEMU's) 1 GHz APIC bus
APIC_ID         equ 0x020               ; the ID in bits 24 ..= 31
APIC_ICR_LOW    equ 0x300
APIC_ICR_HIGH   equ 0x310
ICR_INIT_OTHERS equ 0x000C4500          ; INIT, assert, all excluding self
ICR_SIPI_OTHERS equ 0x000C4600 | (TRAMPOLINE >> 12) ; start-up at TRAMPOLINE
ICR_PENDING     equ 0x1000              ; delivery status: send pending
TRAMPOLINE      equ 0xD000              ; the woken vCPUs' real-mode start
PIC1            equ 0x20                ; command; data at + 1
PIC2            equ 0xA0
PIT_CH0         equ 0x40
PIT_MODE        equ 0x43
PIT_DIVISOR     equ 1193                ; 1.193182 MHz / 1193 = 1000.2 Hz
TIMER_VECTOR    equ 0x20                ; PIC vectors 0x20 ..= 0x2F
SPURIOUS_VECTOR equ 0x2F                ; the LAPIC's (low nibble all ones)
; `int3` from ring 3: halt until woken. #BP, not an `int n` of the guest's
; own choosing, because PVM reflects ring 3's exceptions into the guest's
; IDT but turns `int 0x30` into a #GP (measured: a triple fault).
IDLE_VECTOR     equ 3
WAKE_VECTOR     equ 0x30                ; an idle vCPU's LAPIC timer

DEFAULT_WS_START   equ 0x200000
DEFAULT_WS_PAGES   equ 1024
DEFAULT_BATCH      equ 256
DEFAULT_IDLE_WAKES equ 100

SEL_CODE0 equ 0x08
SEL_DATA0 equ 0x10
SEL_CODE3 equ 0x18 | 3
SEL_DATA3 equ 0x20 | 3
SEL_TSS   equ 0x28

; The guest-physical address of a label, as a plain number.
%define PHYS(label) (label - $$ + LOAD_ADDR)

mb_header:
    dd MB_MAGIC
    dd MB_FLAGS
    dd MB_CHECKSUM
    dd mb_header            ; header_addr
    dd LOAD_ADDR            ; load_addr
    dd image_end            ; load_end_addr
    dd image_end            ; bss_end_addr (no bss)
    dd start                ; entry_addr

; Sends IPI %1 from this LAPIC and waits until it went (no stack needed:
; the loader's esp is undefined).
%macro ipi 1
    mov dword [APIC_BASE + APIC_ICR_LOW], %1
%%pending:
    test dword [APIC_BASE + APIC_ICR_LOW], ICR_PENDING
    jnz %%pending
%endmacro

; edi = this vCPU's index, set by the VMM; taken as 0 without a valid
; parameter block (QEMU's multiboot loader leaves edi undefined). With
; FLAG_START_APS the VMM started vCPU 0 only, as a PC does (QEMU's
; -kernel): every vCPU takes its index from its LAPIC ID instead, and
; vCPU 0 wakes the others with INIT and SIPI into the real-mode trampoline,
; which comes back here in 32-bit protected mode.
start:
    cmp dword [PARAM_ADDR], PARAM_MAGIC
    jne .bsp
    cmp dword [PARAM_ADDR + 4], PARAM_VERSION
    jne .bsp
    test dword [PARAM_ADDR + 28], FLAG_START_APS
    jz .indexed
    mov edi, [APIC_BASE + APIC_ID]
    shr edi, 24
    test edi, edi
    jnz .indexed
    cld
    mov esi, trampoline
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
    rep movsb
    mov dword [APIC_BASE + APIC_ICR_HIGH], 0
    ipi ICR_INIT_OTHERS
    ipi ICR_SIPI_OTHERS
    ipi ICR_SIPI_OTHERS
.bsp:
    xor edi, edi
.indexed:
    and edi, MAX_VCPUS - 1
    lgdt [gdt_desc]
    mov ax, SEL_DATA0
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, edi
    shl esp, 10
    add esp, RING0_STACKS + 0x400
    ; Page tables: PML4[0] -> PDPT, PDPT[0..4] -> 4 page directories of
    ; 512 x 2 MiB pages each = identity map of 0 .. 4 GiB. RAM is zeroed by
    ; the loader, so only the used entries are written. Every vCPU writes
    ; them (the same values) before it turns paging on.
    mov dword [PML4], PDPT | 7              ; present | writable | user
    mov dword [PDPT], (PDS + 0x0000) | 7
    mov dword [PDPT + 8], (PDS + 0x1000) | 7
    mov dword [PDPT + 16], (PDS + 0x2000) | 7
    mov dword [PDPT + 24], (PDS + 0x3000) | 7
    mov edx, PDS
    mov eax, 0x87                           ; present | writable | user | 2 MiB
    xor ebx, ebx                            ; high dword of the frame address
    mov ecx, 2048
.pde:
    mov [edx], eax
    mov [edx + 4], ebx
    add edx, 8
    add eax, 0x200000
    adc ebx, 0
    loop .pde
    mov eax, PML4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                            ; CR4.PAE
    mov cr4, eax
    mov ecx, 0xC0000080                     ; EFER
    rdmsr
    or eax, 0x100                           ; EFER.LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000                      ; CR0.PG
    mov cr0, eax
    jmp SEL_CODE0:long_mode

; Where a woken vCPU starts (copied to TRAMPOLINE by vCPU 0): real mode,
; CS = TRAMPOLINE >> 4. Loads a flat 32-bit GDT of its own (the guest's
; has 64-bit code only), enters protected mode and goes to start.
bits 16
trampoline:
    cli
    lgdt [cs:tramp_gdt_desc - trampoline]
    mov eax, cr0
    or al, 1                                ; CR0.PE
    mov cr0, eax
    jmp dword 0x08:ap_protected
align 8
tramp_gdt:
    dq 0                                    ; null
    dq 0x00CF9A000000FFFF                   ; 0x08 code, 32-bit
    dq 0x00CF92000000FFFF                   ; 0x10 data
tramp_gdt_desc:
    dw tramp_gdt_desc - tramp_gdt - 1
    dd TRAMPOLINE + tramp_gdt - trampoline
trampoline_end:

bits 32
ap_protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    jmp start

bits 64
; Reads the parameter block into the registers ring 3 keeps:
; r12d = vCPU index i, r13d = vCPU count N, r8 = N pages in bytes,
; rsi / rdi = first / end address of this vCPU's pages (equal: idle),
; r15d = batch, r10d = idle_wakes,
; r14 = its stamp counter, r9d = 1 when it writes the serial line.
long_mode:
    mov esp, esp                            ; zero-extends rsp
    mov r12d, edi
    mov r13d, 1
    mov esi, DEFAULT_WS_START
    mov edi, DEFAULT_WS_PAGES
    mov r15d, DEFAULT_BATCH
    mov r10d, DEFAULT_IDLE_WAKES
    xor r9d, r9d
    xor ebp, ebp                            ; 1 = parameters used
    cmp dword [PARAM_ADDR], PARAM_MAGIC
    jne .layout
    cmp dword [PARAM_ADDR + 4], PARAM_VERSION
    jne .layout
    mov esi, [PARAM_ADDR + 8]
    mov edi, [PARAM_ADDR + 12]
    mov r15d, [PARAM_ADDR + 16]
    mov r10d, [PARAM_ADDR + 20]
    mov r13d, [PARAM_ADDR + 24]
    mov r9d, [PARAM_ADDR + 28]
    and r9d, FLAG_DEVICES
    mov ebp, 1
.layout:
    ; This vCPU owns pages i, i+N, ... below ws_pages: its first one is at
    ; ws_start + i * 4096 and its end N * 4096 past its last.
    mov r8d, r13d
    shl r8, 12
    mov eax, r12d
    shl rax, 12
    add rsi, rax
    xor eax, eax                            ; pages owned: none when i >= ws_pages,
    cmp edi, r12d                           ; else ceil((ws_pages - i) / N)
    jbe .owned
    mov eax, edi
    sub eax, r12d
    add eax, r13d
    dec eax
    xor edx, edx
    div r13d
.owned:
    imul rax, r8
    add rax, rsi
    mov rdi, rax
    mov eax, r12d
    shl eax, 6                              ; * STAMPED_STRIDE
    lea r14, [rax + STAMPED_ADDR]
    ; Its own TSS (RSP0, its boot stack, for the interrupts and `int`s it
    ; takes in ring 3; the I/O bitmap every TSS shares, opening every port:
    ; PVM checks it even at IOPL 3) and the IDT.
    shl eax, 1                              ; * TSS_STRIDE in all
    lea rbx, [rax + TSS_ADDR]
    mov [rbx + 4], rsp                      ; rsp0
    mov edx, IO_BITMAP
    sub edx, ebx
    mov [rbx + 102], dx                     ; I/O bitmap offset
    mov byte [IO_BITMAP + IO_BITMAP_BYTES], 0xFF ; the bitmap's end
    lidt [idt_desc]
    mov eax, r12d
    shl eax, 4
    add eax, SEL_TSS
    ltr ax
    cmp rsi, rdi
    jne .busy
    ; Idle: the LAPIC timer, periodic, wakes it every 10 ms.
    mov eax, APIC_BASE
    mov dword [rax + APIC_SVR], 0x100 | SPURIOUS_VECTOR
    mov dword [rax + APIC_TIMER_DIV], TIMER_DIVIDE_1
    mov dword [rax + APIC_LVT_TIMER], TIMER_PERIODIC | WAKE_VECTOR
    mov dword [rax + APIC_TIMER_INIT], WAKE_COUNT
.busy:
    mov eax, 0x3002                         ; rflags: IOPL=3, IF=0
    test r12d, r12d
    jz .bsp
    xor r9d, r9d                            ; the devices are vCPU 0's
.bsp:
    test r9d, r9d
    jz .user
    ; vCPU 0 with the devices: PIT channel 0 at 1 kHz on IRQ 0 of the PIC
    ; (remapped to TIMER_VECTOR, every other line masked) into the LAPIC's
    ; LINT0 as ExtINT, and interrupts on in ring 3.
    mov eax, APIC_BASE
    mov dword [rax + APIC_SVR], 0x100 | SPURIOUS_VECTOR
    mov dword [rax + APIC_LVT0], 0x700      ; ExtINT
    mov al, 0x11                            ; ICW1: edge, cascade, ICW4 follows
    out PIC1, al
    out PIC2, al
    mov al, TIMER_VECTOR                    ; ICW2: vector bases
    out PIC1 + 1, al
    mov al, TIMER_VECTOR + 8
    out PIC2 + 1, al
    mov al, 4                               ; ICW3: slave on IRQ 2
    out PIC1 + 1, al
    mov al, 2
    out PIC2 + 1, al
    mov al, 1                               ; ICW4: 8086 mode
    out PIC1 + 1, al
    out PIC2 + 1, al
    mov al, 0xFE                            ; only IRQ 0
    out PIC1 + 1, al
    mov al, 0xFF
    out PIC2 + 1, al
    mov al, 0x34                            ; channel 0, lo/hi byte, mode 2
    out PIT_MODE, al
    mov al, PIT_DIVISOR & 0xFF
    out PIT_CH0, al
    mov al, PIT_DIVISOR >> 8
    out PIT_CH0, al
    mov eax, 0x3202                         ; rflags: IOPL=3, IF=1
.user:
    mov edx, r12d
    shl edx, 8
    neg rdx
    add rdx, USER_STACKS
    push SEL_DATA3                          ; ss
    push rdx                                ; rsp
    push rax                                ; rflags
    push SEL_CODE3                          ; cs
    push user_entry                         ; rip
    iretq

; Ring 0, vCPU 0 only: count the tick, acknowledge it, go back.
timer_handler:
    inc qword [TICKS_ADDR]
    push rax
    mov al, 0x20                            ; non-specific EOI
    out PIC1, al
    pop rax
    iretq

; Ring 0, an idle vCPU, from `int3` in ring 3 (a DPL 3 gate, so
; interrupts are off here): halt until an interrupt comes, take it (`sti`
; holds it off until `hlt` has begun), go back.
idle_handler:
    sti
    hlt
    iretq

; Ring 0, an idle vCPU's LAPIC timer: acknowledge it, go back.
wake_handler:
    push rax
    mov eax, APIC_BASE
    mov [rax + APIC_EOI], eax               ; any value
    pop rax
    iretq

; The PIC's spurious IRQ 7 / 15 and the LAPIC's spurious vector take no EOI.

spurious_handler:
    iretq

; ---------------------------------------------------------------- ring 3 ---
; ebp = generation, ecx = global page index, rbx = page address,
; r11d = pages left before the next PROGRESS exit.
user_entry:
    mov eax, ebp
    mov dx, PORT_BOOTED
    out dx, eax                             ; 1 = parameters read, 0 = defaults
    cmp rsi, rdi
    je idle
    mov r11d, r15d
    xor ebp, ebp
generation:
    inc ebp
    mov ecx, r12d                           ; the first page's index is i
    mov rbx, rsi
page:
    cmp ebp, 1
    je .stamp
    lea eax, [rbp - 1]
    cmp [rbx], ecx
    jne .bad
    cmp [rbx + 4], eax
    jne .bad
    cmp dword [rbx + 8], STAMP_MAGIC
    jne .bad
    cmp [rbx + 4088], ecx
    jne .bad
    cmp [rbx + 4092], eax
    je .stamp
.bad:
    mov eax, ecx
    mov dx, PORT_MISMATCH
    out dx, eax
.stamp:
    mov [rbx], ecx
    mov [rbx + 4], ebp
    mov dword [rbx + 8], STAMP_MAGIC
    mov eax, ecx
    xor eax, ebp
    not eax
    mov [rbx + 12], eax
    mov [rbx + 4088], ecx
    mov [rbx + 4092], ebp
    inc qword [r14]                         ; after the page's last store
    dec r11d
    jnz .next
    mov r11d, r15d
    mov eax, [r14]                          ; its low 32 bits
    mov dx, PORT_PROGRESS
    out dx, eax
.next:
    test r9d, r9d
    jz .advance
    call serial_line
.advance:
    add rbx, r8
    add ecx, r13d
    cmp rbx, rdi
    jne page
    mov eax, ebp
    mov dx, PORT_GENERATION
    out dx, eax
    jmp generation

; An idle vCPU waits halted, in ring 0, for each interrupt (its LAPIC
; timer; vCPU 0's PIT ticks too, with the devices), and reports every
; idle_wakes of them.
idle:
    mov r11d, r10d
.wait:
    int3
    test r9d, r9d
    jz .counted
    call serial_line
.counted:
    dec r11d
    jnz .wait
    xor eax, eax
    mov dx, PORT_PROGRESS
    out dx, eax
    jmp idle

; Writes the next number of the sequence and a newline to COM1 when its
; tick has come. Keeps every register but rax and rdx.
serial_line:
    mov rax, [TICKS_ADDR]
    cmp rax, [SERIAL_DUE_ADDR]
    jb .done
    add rax, LINE_TICKS
    mov [SERIAL_DUE_ADDR], rax
    push rbx
    push rcx
    mov rax, [SERIAL_SEQ_ADDR]
    mov ebx, 10
    push 10                                 ; '\n', written last
    mov ecx, 1
.digit:
    xor edx, edx
    div rbx
    add edx, '0'
    push rdx
    inc ecx
    test rax, rax
    jnz .digit
    mov dx, COM1
.emit:
    pop rax
    out dx, al
    dec ecx
    jnz .emit
    inc qword [SERIAL_SEQ_ADDR]
    pop rcx
    pop rbx
.done:
    ret

; An interrupt gate (present, DPL %2) to a ring-0 handler.
%macro gate 1-2 0
    dw PHYS(%1) & 0xFFFF
    dw SEL_CODE0
    dw 0x8E00 | (%2 << 13)
    dw PHYS(%1) >> 16
    dd 0
    dd 0
%endmacro

align 8
gdt:
    dq 0                                    ; null
    dq 0x00AF9A000000FFFF                   ; 0x08 code, DPL0, 64-bit
    dq 0x00CF92000000FFFF                   ; 0x10 data, DPL0
    dq 0x00AFFA000000FFFF                   ; 0x18 code, DPL3, 64-bit
    dq 0x00CFF2000000FFFF                   ; 0x20 data, DPL3
; 0x28 + 16 i: vCPU i's 64-bit TSS, its limit reaching the shared I/O
; bitmap's end byte.
%assign i 0
%rep MAX_VCPUS
    dw IO_BITMAP + IO_BITMAP_BYTES - (TSS_ADDR + TSS_STRIDE * i)
    dw (TSS_ADDR + TSS_STRIDE * i) & 0xFFFF
    db ((TSS_ADDR + TSS_STRIDE * i) >> 16) & 0xFF
    db 0x89                                 ; present, available 64-bit TSS
    db 0
    db ((TSS_ADDR + TSS_STRIDE * i) >> 24) & 0xFF
    dd 0
    dd 0
%assign i i + 1
%endrep
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt

align 8
idt_desc:
    dw idt_end - idt - 1
    dq idt

; Exceptions but #BP (IDLE_VECTOR) have no handler: they triple-fault
; and the VMM sees a shutdown exit. The PIC's other lines are masked; a
; stray one is dropped like a spurious one.
align 16
idt:
    times IDLE_VECTOR * 16 db 0
    gate idle_handler, 3                    ; IDLE_VECTOR, for ring 3
    times (TIMER_VECTOR - IDLE_VECTOR - 1) * 16 db 0
    gate timer_handler
%rep SPURIOUS_VECTOR - TIMER_VECTOR
    gate spurious_handler
%endrep
    gate wake_handler                       ; WAKE_VECTOR
idt_end:
image_end:
