/* Close-on-exec of sockets connected by threads whose fd table is not the main thread's.
 *
 *   cloexec_threads PORT MODE N
 *
 * A worker thread connects N fresh TCP sockets to 127.0.0.1:PORT (after one
 * connect that lets the seccomp agent grant the destination), alternating
 * SOCK_CLOEXEC on and off, and checks after each connect that the fd's
 * FD_CLOEXEC is what it asked for. The seccomp agent replaces each socket
 * with a host socket and must take the flag from the *calling thread's* fd
 * table:
 *
 *   main-exits  the main thread has exited (pthread_exit): its fd table is gone
 *   own-table   the worker has a table of its own (unshare(CLONE_FILES)), where
 *               the main thread's table holds an O_CLOEXEC /dev/null at the
 *               same number
 *
 * Prints "connected C wrong W" and exits 0, or exits 2 if it could not run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in target;
static int n, own_table, shadow = -1;

static void *worker(void *arg) {
    (void)arg;
    if (own_table) {
        if (unshare(CLONE_FILES) < 0) {
            perror("unshare");
            exit(2);
        }
        close(shadow); /* free here, still an O_CLOEXEC /dev/null in the main thread's table */
    }
    int warm = socket(AF_INET, SOCK_STREAM, 0);
    if (warm < 0 || connect(warm, (struct sockaddr *)&target, sizeof target) < 0) {
        perror("first connect");
        exit(2);
    }
    close(warm);
    int connected = 0, wrong = 0;
    for (int i = 0; i < n; i++) {
        int want = i % 2;
        int s = socket(AF_INET, SOCK_STREAM | (want ? SOCK_CLOEXEC : 0), 0);
        if (s < 0) {
            perror("socket");
            exit(2);
        }
        if (own_table && s != shadow) {
            fprintf(stderr, "socket got fd %d, not %d\n", s, shadow);
            exit(2);
        }
        if (connect(s, (struct sockaddr *)&target, sizeof target) == 0) {
            connected++;
            int flags = fcntl(s, F_GETFD);
            if (flags < 0 || !!(flags & FD_CLOEXEC) != want)
                wrong++;
        }
        close(s);
    }
    printf("connected %d wrong %d\n", connected, wrong);
    fflush(stdout);
    exit(0);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT main-exits|own-table N\n", argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[1]));
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    own_table = strcmp(argv[2], "own-table") == 0;
    n = atoi(argv[3]);
    if (own_table && (shadow = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        perror("open");
        return 2;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 2;
    if (own_table) {
        pthread_join(t, NULL); /* the worker exits the process */
        return 2;
    }
    pthread_exit(NULL); /* the process lives on in the worker */
}
