# idle: spins (`pause` x spin) between steps and writes almost nothing: step i
# stores i in word 0 of page v of the working set. Every record_every steps it
# emits (i, i). Oracle: src/oracle.rs.
.include "common.inc"
.globl _start
_start:
    PROLOGUE
    mov rbx, r14
    shl rbx, 12
    add rbx, [r15 + P_WS_BASE]      # this vCPU's page
    xor ebp, ebp
    mov r11, [r15 + P_RECORD_EVERY]
step:
    cmp rbp, [r15 + P_STEPS]
    jae done
    mov rcx, [r15 + P_SPIN]
1:  pause
    dec rcx
    jnz 1b
    inc rbp
    mov [rbx], rbp
    mov [r8 + M_PROGRESS], rbp
    dec r11
    jnz step
    EMIT_RECORD rbp
    mov r11, [r15 + P_RECORD_EVERY]
    jmp step
    EPILOGUE
