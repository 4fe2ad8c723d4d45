/* The time-of-check/time-of-use race of seccomp agents (bypass4netns documents it).
 *
 *   toctou_connect ALLOWED_PORT FORBIDDEN_PORT ITERATIONS
 *
 * A racing thread rewrites the port of one shared sockaddr_in (127.0.0.1)
 * between ALLOWED_PORT and FORBIDDEN_PORT as fast as it can, while the main
 * thread connects a fresh TCP socket to that sockaddr ITERATIONS times. The
 * agent reads the address once to judge it; the kernel reads it again when
 * the call goes on. Whatever the agent saw, no connect may reach the
 * forbidden port: the test counts arrivals on a listener there.
 *
 * Prints one line: "connected N refused M other K flips F" (refused: EPERM
 * or EACCES). Exit 0 unless the program itself failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in target;
static atomic_int stop;
static unsigned short ports[2];
static unsigned long flips;

static void *flipper(void *arg)
{
    (void)arg;
    unsigned i = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        /* A plain volatile store: the point is that nothing orders it against the kernel's read. */
        *(volatile unsigned short *)&target.sin_port = htons(ports[i++ & 1]);
        flips++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s ALLOWED_PORT FORBIDDEN_PORT ITERATIONS\n", argv[0]);
        return 2;
    }
    ports[0] = (unsigned short)atoi(argv[1]);
    ports[1] = (unsigned short)atoi(argv[2]);
    long iterations = atol(argv[3]);
    target.sin_family = AF_INET;
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    target.sin_port = htons(ports[0]);

    pthread_t t;
    if (pthread_create(&t, NULL, flipper, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    long connected = 0, refused = 0, other = 0;
    for (long i = 0; i < iterations; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0)
            connected++;
        else if (errno == EPERM || errno == EACCES)
            refused++;
        else
            other++;
        close(fd);
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("connected %ld refused %ld other %ld flips %lu\n", connected, refused, other, flips);
    return 0;
}
