; livemig demo guest: a flat 32-bit multiboot (v1) image.
;
; Boot (ring 0, emulated under PVM, so kept short): load a GDT with 64-bit
; ring-0 and ring-3 segments, read the parameter block, identity-map the low
; 4 GiB with user-accessible 2 MiB pages, enter long mode and drop to ring 3
; with IOPL=3. (PVM runs guest ring 3 natively only with long-mode paging.) Workload (ring 3, native): stamp every page of the working set with
; its page index and a generation, checking the previous generation's stamp
; first; count the pages stamped in memory at STAMPED_ADDR (so the VMM
; knows exactly where the guest stood at any stop); report progress,
; generations and mismatches with `out`.
; See README.md for the parameter block and port map.

bits 32
org 0x100000

LOAD_ADDR       equ 0x100000

MB_MAGIC        equ 0x1BADB002
MB_FLAGS        equ 0x00010000          ; bit 16: a.out kludge address fields valid
MB_CHECKSUM     equ -(MB_MAGIC + MB_FLAGS)

PARAM_ADDR      equ 0x5000
PARAM_MAGIC     equ 0x50474D4C          ; "LMGP" little-endian
PARAM_VERSION   equ 1

PORT_BOOTED     equ 0x510
PORT_PROGRESS   equ 0x514
PORT_GENERATION equ 0x518
PORT_MISMATCH   equ 0x51C

STAMPED_ADDR    equ 0x5100              ; u64: pages stamped since boot

STAMP_MAGIC     equ 0x47494D4C          ; "LMIG"
RING0_STACK     equ 0x8000
PML4            equ 0x10000              ; then PDPT, then 4 page directories
PDPT            equ 0x11000
PDS             equ 0x12000
USER_STACK      equ 0x7000

DEFAULT_WS_START   equ 0x200000
DEFAULT_WS_PAGES   equ 1024
DEFAULT_BATCH      equ 256
DEFAULT_IDLE_SPINS equ 4000000

SEL_CODE0 equ 0x08
SEL_DATA0 equ 0x10
SEL_CODE3 equ 0x18 | 3
SEL_DATA3 equ 0x20 | 3

mb_header:
    dd MB_MAGIC
    dd MB_FLAGS
    dd MB_CHECKSUM
    dd mb_header            ; header_addr
    dd LOAD_ADDR            ; load_addr
    dd image_end            ; load_end_addr
    dd image_end            ; bss_end_addr (no bss)
    dd start                ; entry_addr

start:
    lgdt [gdt_desc]
    mov ax, SEL_DATA0
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, RING0_STACK
    ; Defaults first; replaced when a valid parameter block is present.
    mov dword [ws_start], DEFAULT_WS_START
    mov dword [ws_pages], DEFAULT_WS_PAGES
    mov dword [batch], DEFAULT_BATCH
    mov dword [idle_spins], DEFAULT_IDLE_SPINS
    cmp dword [PARAM_ADDR], PARAM_MAGIC
    jne .paging
    cmp dword [PARAM_ADDR + 4], PARAM_VERSION
    jne .paging
    mov eax, [PARAM_ADDR + 8]
    mov [ws_start], eax
    mov eax, [PARAM_ADDR + 12]
    mov [ws_pages], eax
    mov eax, [PARAM_ADDR + 16]
    mov [batch], eax
    mov eax, [PARAM_ADDR + 20]
    mov [idle_spins], eax
    mov dword [params_used], 1
.paging:
    ; Page tables: PML4[0] -> PDPT, PDPT[0..4] -> 4 page directories of
    ; 512 x 2 MiB pages each = identity map of 0 .. 4 GiB. RAM is zeroed by
    ; the loader, so only the used entries are written.
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

bits 64
long_mode:
    mov rsp, RING0_STACK
    push SEL_DATA3                          ; ss
    push USER_STACK                         ; rsp
    push 0x3002                             ; rflags: IOPL=3, IF=0
    push SEL_CODE3                          ; cs
    push user_entry                         ; rip
    iretq

; ---------------------------------------------------------------- ring 3 ---
; rsi = working-set base, edi = page count, ebp = generation,
; ecx = page index, rbx = page address.
user_entry:
    mov eax, [params_used]
    mov dx, PORT_BOOTED
    out dx, eax                             ; 1 = parameters read, 0 = defaults
    mov esi, [ws_start]
    mov edi, [ws_pages]
    test edi, edi
    jz idle
    mov eax, [batch]
    mov [batch_left], eax
    xor ebp, ebp
generation:
    inc ebp
    xor ecx, ecx
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
    inc qword [STAMPED_ADDR]                ; after the page's last store
    dec dword [batch_left]
    jnz .next
    mov eax, [batch]
    mov [batch_left], eax
    mov eax, [STAMPED_ADDR]                 ; its low 32 bits
    mov dx, PORT_PROGRESS
    out dx, eax
.next:
    add rbx, 4096
    inc ecx
    cmp ecx, edi
    jne page
    mov eax, ebp
    mov dx, PORT_GENERATION
    out dx, eax
    jmp generation

idle:
    mov ecx, [idle_spins]
.spin:
    pause
    dec ecx
    jnz .spin
    xor eax, eax
    mov dx, PORT_PROGRESS
    out dx, eax
    jmp idle

align 8
gdt:
    dq 0                                    ; null
    dq 0x00AF9A000000FFFF                   ; 0x08 code, DPL0, 64-bit
    dq 0x00CF92000000FFFF                   ; 0x10 data, DPL0
    dq 0x00AFFA000000FFFF                   ; 0x18 code, DPL3, 64-bit
    dq 0x00CFF2000000FFFF                   ; 0x20 data, DPL3
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt

align 4
ws_start:    dd 0
ws_pages:    dd 0
batch:       dd 0
batch_left:  dd 0
idle_spins:  dd 0
params_used: dd 0
image_end:
