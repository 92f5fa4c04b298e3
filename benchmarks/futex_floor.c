/* The floor under a sleeping ring reader's latency: how long the kernel (and, on a VM, the
 * hypervisor) takes from FUTEX_WAKE in one process to FUTEX_WAIT returning in another, with no
 * Python anywhere. benchmarks/bench_ring.py::test_futex_wake_floor builds and runs it; what the
 * Python reader adds on top of this is ours.
 *
 * usage: futex_floor N GAP_US WAKER_CPU SLEEPER_CPU  ->  one latency in ns per line on stdout
 * The sleeper sleeps on a shared word; the waker stamps CLOCK_MONOTONIC, bumps the word and
 * wakes it, N times, GAP_US apart (so each wake finds the sleeper asleep).
 */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void pin(int cpu) {
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

struct shared {
    volatile uint32_t word;     /* the futex */
    volatile int64_t stamp;     /* the waker's clock just before FUTEX_WAKE */
    volatile int64_t lat[];     /* filled by the sleeper */
};

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s N GAP_US WAKER_CPU SLEEPER_CPU\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), gap_us = atoi(argv[2]);
    int waker_cpu = atoi(argv[3]), sleeper_cpu = atoi(argv[4]);
    size_t size = sizeof(struct shared) + (size_t)n * sizeof(int64_t);
    struct shared *sh = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                             -1, 0);
    if (sh == MAP_FAILED)
        return 1;
    pid_t pid = fork();
    if (pid == 0) { /* the sleeper */
        pin(sleeper_cpu);
        for (int i = 0; i < n; i++) {
            while (__atomic_load_n(&sh->word, __ATOMIC_SEQ_CST) == (uint32_t)i)
                syscall(SYS_futex, &sh->word, FUTEX_WAIT, (uint32_t)i, NULL, NULL, 0);
            sh->lat[i] = now_ns() - sh->stamp;
        }
        _exit(0);
    }
    pin(waker_cpu);
    struct timespec gap = {0, gap_us * 1000L};
    for (int i = 0; i < n; i++) {
        nanosleep(&gap, NULL);
        sh->stamp = now_ns();
        __atomic_store_n(&sh->word, (uint32_t)(i + 1), __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &sh->word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
    waitpid(pid, NULL, 0);
    for (int i = 0; i < n; i++)
        printf("%lld\n", (long long)sh->lat[i]);
    return 0;
}
