/* Allocations that glibc hands from one probed function to another:
 * realloc(NULL, n) returns malloc(n), and posix_memalign with an alignment
 * malloc gives anyway returns malloc(n) too. Each must be counted once.
 * Protocol as the Rust fixture: "ready <pid>", wait for "go", allocate,
 * print "done {json}", wait for end of input. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 1000
#define SIZE 4096

static void *kept[3 * N];

__attribute__((noinline)) void grow_from_null(void **out) {
    for (int i = 0; i < N; i++) {
        out[i] = realloc(NULL, SIZE);
        memset(out[i], 1, SIZE);
    }
}

__attribute__((noinline)) void align_like_malloc(void **out) {
    for (int i = 0; i < N; i++) {
        if (posix_memalign(&out[i], 16, SIZE) != 0) abort();
        memset(out[i], 1, SIZE);
    }
}

__attribute__((noinline)) void align_to_page(void **out) {
    for (int i = 0; i < N; i++) {
        if (posix_memalign(&out[i], 4096, SIZE) != 0) abort();
        memset(out[i], 1, SIZE);
    }
}

int main(void) {
    char line[64];
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2) != 0) return 1;
    grow_from_null(kept);
    align_like_malloc(kept + N);
    align_to_page(kept + 2 * N);
    printf("done {\"each_bytes\":%d}\n", N * SIZE);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "exit", 4) == 0) break;
    }
    return 0;
}
