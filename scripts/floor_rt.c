/* The floor under a round trip: one writer broadcasts a ~200-byte message to N reader processes through shared
 * memory and waits until every reader has answered, all in C, every process busy-polling without pause or sleep.
 * No pickling, no locks, no Python: what the host's cores, caches and interruptions allow any transport.
 * bench_transport.py compiles and runs it as the peer "c", batch by batch like the others; the median says what
 * the hardware costs, the p99 what the host's interruptions add to a call that keeps N+1 processes busy.
 *
 *   floor_rt N CALLS [CPUS]     prints one latency in ns per call.
 *   CPUS (comma-separated): the writer on the first, reader r on the (r+1)-th (modulo their count).
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LINE 64
#define MSG 200
#define STOP UINT64_MAX

struct shared {
    _Alignas(LINE) uint64_t seq;           /* the writer's sequence number: a new message is there */
    _Alignas(LINE) char msg[4 * LINE];     /* the message itself */
    _Alignas(LINE) struct { uint64_t ack; char pad[LINE - 8]; } reply[256];  /* one line per reader */
};

static int cpus[CPU_SETSIZE], ncpus;

static void pin(int nth) {
    cpu_set_t one;
    if (!ncpus) return;
    CPU_ZERO(&one);
    CPU_SET(cpus[nth % ncpus], &one);
    sched_setaffinity(0, sizeof one, &one);
}

static uint64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void reader(struct shared *sh, int r) {
    char local[MSG];
    uint64_t last = 0;
    for (;;) {
        uint64_t s;
        while ((s = __atomic_load_n(&sh->seq, __ATOMIC_ACQUIRE)) == last) __builtin_ia32_pause();
        if (s == STOP) break;
        memcpy(local, sh->msg, MSG);  /* read what was sent, as any receiver must */
        last = s;
        sh->reply[r].pad[0] = local[MSG - 1];  /* use what was read, so the copy is not optimised away */
        __atomic_store_n(&sh->reply[r].ack, s, __ATOMIC_RELEASE);
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: floor_rt N CALLS [PIN]\n"); return 2; }
    int n = atoi(argv[1]);
    long calls = atol(argv[2]);
    for (char *p = argc > 3 ? argv[3] : ""; *p && ncpus < CPU_SETSIZE; p += *p == ',')
        cpus[ncpus++] = (int)strtol(p, &p, 10);
    int pinned = ncpus > 0;
    if (n < 1 || n > 256 || calls < 1) { fprintf(stderr, "floor_rt: N in 1..256, CALLS >= 1\n"); return 2; }
    struct shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) { perror("mmap"); return 1; }
    memset(sh, 0, sizeof *sh);
    pid_t *kids = calloc(n, sizeof *kids);
    for (int r = 0; r < n; r++) {
        kids[r] = fork();
        if (kids[r] < 0) { perror("fork"); return 1; }
        if (kids[r] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (pinned) pin(r + 1);
            reader(sh, r);
        }
    }
    if (pinned) pin(0);
    uint64_t *lat = malloc(calls * sizeof *lat);
    char msg[MSG];
    for (int i = 0; i < MSG; i++) msg[i] = (char)i;
    long warm = calls / 10 + 100;
    for (long i = 1; i <= warm + calls; i++) {
        uint64_t t0 = now_ns(CLOCK_MONOTONIC);
        memcpy(sh->msg, msg, MSG);
        __atomic_store_n(&sh->seq, (uint64_t)i, __ATOMIC_RELEASE);
        for (int r = 0; r < n; r++)
            while (__atomic_load_n(&sh->reply[r].ack, __ATOMIC_ACQUIRE) != (uint64_t)i) __builtin_ia32_pause();
        if (i > warm) lat[i - warm - 1] = now_ns(CLOCK_MONOTONIC) - t0;
    }
    __atomic_store_n(&sh->seq, STOP, __ATOMIC_RELEASE);
    for (int r = 0; r < n; r++) waitpid(kids[r], NULL, 0);
    for (long i = 0; i < calls; i++) printf("%llu\n", (unsigned long long)lat[i]);
    return 0;
}
