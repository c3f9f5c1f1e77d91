/*
 * The pod sandbox process of the local node ("pause" image): it holds the pod's namespaces and
 * does nothing else. As PID 1 of the pod's PID namespace (shareProcessNamespace) it reaps every
 * child that is handed to it; SIGTERM or SIGINT ends it with status 0.
 *
 * Built statically by e2e/localcluster/images.py with the host's gcc: gcc -static -Os -s.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int on(int sig, void (*handler)(int), int flags) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(sig, &action, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("finetune-pause 1");
        return 0;
    }
    if (on(SIGINT, stop, 0) || on(SIGTERM, stop, 0) || on(SIGCHLD, reap, SA_NOCLDSTOP | SA_RESTART)) {
        perror("pause: sigaction");
        return 1;
    }
    if (getpid() != 1) {
        fputs("pause: not running as PID 1; children of this namespace are not reaped here\n", stderr);
    }
    for (;;) {
        pause();
    }
}
