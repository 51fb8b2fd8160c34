/*
 * A process with no allocator at all, for the memory tests' "process
 * without a known allocator" case: no libc, no malloc, no dynamic linker.
 * It prints `ready <pid>` and sleeps until it is killed.
 *
 *   gcc -static -nostdlib -O2 -o noalloc noalloc.c
 *
 * The test harness compiles it at test time (tests/src/memory.rs,
 * build_noalloc); no build script does.
 */

#if defined(__x86_64__)
#define SYS_WRITE 1
#define SYS_NANOSLEEP 35
#define SYS_GETPID 39

static long sys3(long n, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

/* The kernel enters with %rsp 16-byte aligned and no return address:
 * call the C entry so that it sees the stack the ABI promises. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	and $-16, %rsp\n"
	"	call noalloc_main\n"
	"	hlt\n");
#elif defined(__aarch64__)
#define SYS_WRITE 64
#define SYS_NANOSLEEP 101
#define SYS_GETPID 172

static long sys3(long n, long a, long b, long c)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	__asm__ volatile("svc #0"
			 : "+r"(x0)
			 : "r"(x8), "r"(x1), "r"(x2)
			 : "memory");
	return x0;
}

__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	mov x29, #0\n"
	"	mov x30, #0\n"
	"	bl noalloc_main\n"
	"1:	b 1b\n");
#else
#error "noalloc.c knows the syscalls of x86_64 and aarch64 only"
#endif

/* Nothing here sets up a stack guard, so none may be checked. */
#if defined(__has_attribute)
#if __has_attribute(no_stack_protector)
#define NO_STACK_PROTECTOR __attribute__((no_stack_protector))
#endif
#endif
#ifndef NO_STACK_PROTECTOR
#define NO_STACK_PROTECTOR
#endif

struct timespec_k {
	long tv_sec;
	long tv_nsec;
};

__attribute__((noreturn, used)) NO_STACK_PROTECTOR void
noalloc_main(void)
{
	char buf[32];
	int len = 0;
	char digits[20];
	int n = 0;
	unsigned long pid = (unsigned long)sys3(SYS_GETPID, 0, 0, 0);

	do {
		digits[n++] = (char)('0' + pid % 10);
		pid /= 10;
	} while (pid != 0);
	buf[len++] = 'r';
	buf[len++] = 'e';
	buf[len++] = 'a';
	buf[len++] = 'd';
	buf[len++] = 'y';
	buf[len++] = ' ';
	while (n > 0)
		buf[len++] = digits[--n];
	buf[len++] = '\n';
	sys3(SYS_WRITE, 1, (long)buf, len);

	for (;;) {
		volatile struct timespec_k ts;
		ts.tv_sec = 1;
		ts.tv_nsec = 0;
		sys3(SYS_NANOSLEEP, (long)&ts, 0, 0);
	}
}
