/*
 * fork_inflight.c: threads graft connects while another thread forks; every
 * fork child checks that it holds none of the shim's own sockets
 * (tests/e2e/test_fork_inflight.py runs it under graft, on the broker's slow
 * path and on the pre-issued fast path).
 *
 * usage: fork_inflight HOST PORT THREADS FORKS
 *
 * The app's own view is exact at every fork: a connecting thread records a
 * socket right after socket() and unrecords it right before close(), both
 * under app_lock, and the forking thread holds app_lock across fork(). The
 * connect() itself runs outside app_lock, so a fork can fall on any step
 * the shim takes inside it. A child then lists its fd table: a socket the
 * app had not recorded is one of the shim's (a host socket received from
 * the broker or taken from a pre-issued pool on its way onto the app's fd,
 * a pooled pre-issued socket, a broker connection), which a fork child
 * must never hold: it would keep the connection open after the parent
 * closes it, so the peer would see no FIN until the child exits. The child
 * reports what it found in its exit status, and exits at once.
 *
 * Connects are non-blocking (the app closes each right away), so the run
 * does not depend on how fast the peer accepts. Prints one JSON line:
 * {"forks": F, "connects": C, "failed": E, "first_error": errno,
 *  "leaky": {"inet": N, "unix": N, "other": N}} (children holding such a
 * socket, by its family).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FD 65536

/* Exit status bits of a child: the families of the foreign sockets it held. */
#define LEAK_INET 1
#define LEAK_UNIX 2
#define LEAK_OTHER 4

static pthread_mutex_t app_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool mine[MAX_FD]; /* the app's own sockets, under app_lock */
static atomic_bool stop;
static atomic_long connects, failed;
static atomic_int first_error;
static struct sockaddr_in target;

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void *connect_loop(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        pthread_mutex_lock(&app_lock);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd >= 0 && fd < MAX_FD)
            atomic_store(&mine[fd], true);
        pthread_mutex_unlock(&app_lock);
        if (fd < 0 || fd >= MAX_FD)
            die("socket");

        /* Grafted: 0 or EINPROGRESS. Native, in a namespace with only lo: ECONNREFUSED. */
        if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0 || errno == EINPROGRESS) {
            atomic_fetch_add(&connects, 1);
        } else {
            int expected = 0;
            atomic_compare_exchange_strong(&first_error, &expected, errno);
            atomic_fetch_add(&failed, 1);
        }

        pthread_mutex_lock(&app_lock);
        atomic_store(&mine[fd], false);
        close(fd);
        pthread_mutex_unlock(&app_lock);
    }
    return NULL;
}

static int family_of(int fd)
{
    int domain;
    socklen_t len = sizeof domain;
    return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 ? domain : -1;
}

/* In a fork child: the families of the sockets the app did not have, as LEAK_* bits. */
static int foreign_sockets(void)
{
    struct linux_dirent64 {
        ino64_t d_ino;
        off64_t d_off;
        unsigned short d_reclen;
        unsigned char d_type;
        char d_name[];
    };
    char buf[8192];
    int leaks = 0;
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return LEAK_OTHER;
    long n;
    while ((n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
        for (long off = 0; off < n;) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
            off += d->d_reclen;
            if (d->d_name[0] == '.')
                continue;
            int fd = atoi(d->d_name);
            struct stat st;
            if (fd == dir || fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode) ||
                (fd < MAX_FD && atomic_load(&mine[fd])))
                continue;
            int family = family_of(fd);
            leaks |= family == AF_INET || family == AF_INET6 ? LEAK_INET
                     : family == AF_UNIX                     ? LEAK_UNIX
                                                             : LEAK_OTHER;
        }
    }
    return leaks;
}

/* Sockets the program was started with are the app's, like the ones it creates. */
static void record_inherited_sockets(void)
{
    for (int fd = 0; fd < 1024; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode))
            atomic_store(&mine[fd], true);
    }
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT THREADS FORKS\n", argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1)
        die("inet_pton");
    int threads = atoi(argv[3]);
    long forks = atol(argv[4]);
    record_inherited_sockets();

    pthread_t tids[64];
    if (threads < 1 || threads > 64)
        return 2;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&tids[i], NULL, connect_loop, NULL) != 0)
            die("pthread_create");

    long leaky_inet = 0, leaky_unix = 0, leaky_other = 0;
    for (long i = 0; i < forks; i++) {
        pthread_mutex_lock(&app_lock);
        pid_t pid = fork();
        if (pid == 0)
            _exit(foreign_sockets());
        pthread_mutex_unlock(&app_lock);
        if (pid < 0)
            die("fork");
        int status;
        if (waitpid(pid, &status, 0) != pid)
            die("waitpid");
        if (!WIFEXITED(status)) {
            fprintf(stderr, "child %d died: status %#x\n", pid, status);
            return 2;
        }
        int leaks = WEXITSTATUS(status);
        leaky_inet += (leaks & LEAK_INET) != 0;
        leaky_unix += (leaks & LEAK_UNIX) != 0;
        leaky_other += (leaks & LEAK_OTHER) != 0;
    }

    atomic_store(&stop, true);
    for (int i = 0; i < threads; i++)
        pthread_join(tids[i], NULL);
    printf("{\"forks\": %ld, \"connects\": %ld, \"failed\": %ld, \"first_error\": %d, "
           "\"leaky\": {\"inet\": %ld, \"unix\": %ld, \"other\": %ld}}\n",
           forks, atomic_load(&connects), atomic_load(&failed), atomic_load(&first_error), leaky_inet,
           leaky_unix, leaky_other);
    return 0;
}
