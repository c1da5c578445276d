/*
 * pingpong - the context-switch benchmark's workload (bench/ctxswitch.py): two
 * processes on one CPU hand a byte back and forth through two pipes, so every hand-off
 * is a wake-up and a context switch.
 *
 * usage: pingpong CPU ROUNDS [TAP]
 *   With TAP, the parent first holds that tap (/dev/net/tun, as QEMU does): the pair is
 *   then "a VM" whose threads vm_network_latency.py --explain follows. It prints
 *   "ready", waits for a line on stdin, runs ROUNDS round trips (2 * ROUNDS context
 *   switches) and prints the wall time per switch in ns.
 * Build: gcc -O2 -o pingpong pingpong.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set)) {
        perror("sched_setaffinity");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: pingpong CPU ROUNDS [TAP]\n");
        return 2;
    }
    int cpu = atoi(argv[1]);
    long rounds = atol(argv[2]);
    if (argc > 3) {
        struct ifreq ifr;
        int fd = open("/dev/net/tun", O_RDWR);
        memset(&ifr, 0, sizeof(ifr));
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
        strncpy(ifr.ifr_name, argv[3], IFNAMSIZ - 1);
        if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr)) {
            perror("tap");
            return 1;
        }
    }
    int ab[2], ba[2];
    if (pipe(ab) || pipe(ba)) {
        perror("pipe");
        return 1;
    }
    pin(cpu);
    pid_t child = fork();
    if (child == 0) {
        char c;
        for (;;) {
            if (read(ab[0], &c, 1) != 1 || c == 'q')
                _exit(0);
            if (write(ba[1], &c, 1) != 1)
                _exit(1);
        }
    }
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    struct timespec t0, t1;
    char c = 'x';
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < rounds; i++) {
        if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1) {
            perror("pingpong");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c = 'q';
    if (write(ab[1], &c, 1) != 1)
        return 1;
    waitpid(child, NULL, 0);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%.1f\n", ns / (2.0 * rounds));
    return 0;
}
