# ledger: a deterministic hash chain over the working set.
# vCPU v owns pages v, v+n, v+2n, ... of the working set. Step i (1-based):
#   x = h ^ (i * GOLDEN)
#   repeat writes_per_step times:
#     x = mix(x); j = (x * ppv) >> 64; page = v + n*j; word = (x >> 7) & 511
#     new = mix(mem[page][word] ^ x); mem[page][word] = new; h = mix(h + new)
#   mailbox.progress = i; every record_every steps emit (i, h).
# Initial h = mix(seed + v). The host oracle (src/oracle.rs) mirrors this.
.include "common.inc"
.globl _start
_start:
    PROLOGUE
    SEED_PER_VCPU                   # rbx = h
    xor ebp, ebp                    # i: completed steps
    mov r11, [r15 + P_RECORD_EVERY] # countdown to the next record
step:
    cmp rbp, [r15 + P_STEPS]
    jae done
    inc rbp
    movabs rax, GOLDEN
    imul rax, rbp
    xor rax, rbx
    mov r10, rax                    # x
    mov r9, [r15 + P_WRITES_PER_STEP]
write:
    mov rax, r10
    MIX
    mov r10, rax                    # x = mix(x)
    mul r12                         # rdx = (x * ppv) >> 64 = j
    imul rdx, r13
    add rdx, r14                    # page = v + n*j
    shl rdx, 12
    mov rax, r10
    shr rax, 7
    and rax, 511
    lea rdx, [rdx + rax*8]
    add rdx, [r15 + P_WS_BASE]      # address of the word
    mov rax, [rdx]
    xor rax, r10
    MIX
    mov [rdx], rax                  # new
    add rbx, rax
    mov rax, rbx
    MIX
    mov rbx, rax                    # h = mix(h + new)
    dec r9
    jnz write
    mov [r8 + M_PROGRESS], rbp
    dec r11
    jnz step
    EMIT_RECORD rbx
    mov r11, [r15 + P_RECORD_EVERY]
    jmp step
    EPILOGUE
