# dirty: writes one page per step of vCPU v's share of the working set, at a set
# rate and pattern. Write i (1-based) stores i in word 0 of the chosen page j:
#   sequential: j = (i - 1) mod ppv
#   random:     x = mix(s ^ i*GOLDEN), j = (x * ppv) >> 64
#   hot/cold:   as random, but j = (x * hot_pages) >> 64 when (x & 1023) < hot_threshold
# where s = mix(seed + v); page = v + n*j. ticks_per_write > 0 paces the writes on
# the TSC. Every record_every writes it emits (i, j). Oracle: src/oracle.rs.
.include "common.inc"
.globl _start
_start:
    PROLOGUE
    SEED_PER_VCPU                   # rbx = s
    xor ebp, ebp                    # i: completed writes
    xor esi, esi                    # sequential cursor
    mov r11, [r15 + P_RECORD_EVERY]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdi, rax                    # pacing deadline
step:
    cmp rbp, [r15 + P_STEPS]
    jae done
    inc rbp
    mov r10, [r15 + P_PATTERN]
    cmp r10, PATTERN_SEQUENTIAL
    jne 1f
    mov r9, rsi                     # j = cursor
    inc rsi
    cmp rsi, r12
    jb have_page
    xor esi, esi
    jmp have_page
1:  movabs rax, GOLDEN
    imul rax, rbp
    xor rax, rbx
    MIX
    mov r9, rax                     # x
    cmp r10, PATTERN_HOT_COLD
    jne 2f
    mov rcx, r9
    and rcx, 1023
    cmp rcx, [r15 + P_HOT_THRESHOLD]
    jae 2f
    mul qword ptr [r15 + P_HOT_PAGES]
    mov r9, rdx
    jmp have_page
2:  mul r12
    mov r9, rdx                     # j
have_page:
    mov rdx, r9
    imul rdx, r13
    add rdx, r14
    shl rdx, 12
    add rdx, [r15 + P_WS_BASE]
    mov [rdx], rbp
    mov [r8 + M_PROGRESS], rbp
    mov rcx, [r15 + P_TICKS_PER_WRITE]
    test rcx, rcx
    jz 4f
    add rdi, rcx
3:  pause
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rdi
    jb 3b
4:  dec r11
    jnz step
    EMIT_RECORD r9
    mov r11, [r15 + P_RECORD_EVERY]
    jmp step
    EPILOGUE
