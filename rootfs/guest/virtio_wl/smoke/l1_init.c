// SPDX-License-Identifier: Apache-2.0
/*
 * l1_init: /init of a QEMU-emulated host (L1) that runs bulkhead-vmm on nested KVM with the
 * wl_smoke guest (L2), and plays the host peer itself (the host side of the exchange).
 * Prints "L1: peer ok" / "L1: peer FAIL ..." and the VMM's exit status, then powers off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define SOCK "/tmp/wl.sock"

static void die(const char *m)
{
	printf("L1: peer FAIL: %s (errno %d)\n", m, errno);
	fflush(stdout);
	_exit(1);
}
#define CHECK(c, m) do { if (!(c)) die(m); } while (0)

static void load(const char *p)
{
	int fd = open(p, O_RDONLY);

	if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST))
		printf("L1: cannot load %s: %d\n", p, errno);
	close(fd);
}

static int recv_fds(int s, char *buf, size_t len, int *fds, int max)
{
	char cbuf[CMSG_SPACE(28 * sizeof(int))];
	struct iovec iov = { buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	int n, nfds = 0;

	n = recvmsg(s, &mh, 0);
	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_type == SCM_RIGHTS) {
			int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

			for (int i = 0; i < k && nfds < max; i++)
				memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
		}
	}
	return n < 0 ? n : nfds;
}

static void send_fd(int s, const char *data, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { (void *)data, strlen(data) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	CHECK(sendmsg(s, &mh, 0) > 0, "sendmsg");
}

static void peer(int srv)
{
	char buf[4096] = { 0 };
	int fds[28], n, c, h;
	char *m, *hm;

	c = accept(srv, NULL, NULL);
	CHECK(c >= 0, "accept");
	n = recv_fds(c, buf, sizeof(buf), fds, 28);
	CHECK(n == 2, "two fds");
	CHECK(!strcmp(buf, "hello from guest"), "data");
	CHECK(lseek(fds[0], 0, SEEK_END) == 8192, "shm size");
	m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	CHECK(m != MAP_FAILED, "mmap shm");
	CHECK(!strcmp(m, "guest-shm-data"), "shm contents");
	strcpy(m + 100, "host-was-here");
	CHECK(write(fds[1], "pipe-data", 9) == 9, "pipe write");
	close(fds[1]);
	h = memfd_create("host-buf", 0);
	CHECK(h >= 0 && ftruncate(h, 8192) == 0, "memfd");
	hm = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, h, 0);
	CHECK(hm != MAP_FAILED, "mmap memfd");
	strcpy(hm, "host-memfd");
	send_fd(c, "hello from host", h);
	memset(buf, 0, sizeof(buf));
	CHECK(read(c, buf, 4) == 4 && !memcmp(buf, "done", 4), "done");
	CHECK(!strcmp(hm + 200, "guest-wrote-host-memfd"), "guest write visible in host memfd");
	CHECK(write(c, "ok", 2) == 2, "ok");
	printf("L1: peer ok\n");
	fflush(stdout);
	read(c, buf, 1);
	_exit(0);
}

int main(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX, .sun_path = SOCK };
	int srv, st;
	pid_t p, v;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);
	load("/lib/irqbypass.ko");
	load("/lib/kvm.ko");
	load("/lib/kvm-amd.ko");
	srv = socket(AF_UNIX, SOCK_STREAM, 0);
	if (bind(srv, (void *)&sa, sizeof(sa)) || listen(srv, 1))
		printf("L1: bind failed %d\n", errno);
	p = fork();
	if (p == 0)
		peer(srv);
	v = fork();
	if (v == 0) {
		execl("/bin/bulkhead-vmm", "bulkhead-vmm", "--kernel", "/l2/vmlinuz", "--initramfs",
		      "/l2/initramfs.cpio", "--cmdline", "console=ttyS0 panic=-1",
		      "--memory", "256M", "--serial-input", "false", "--wl-socket", SOCK, NULL);
		_exit(127);
	}
	waitpid(v, &st, 0);
	printf("L1: vmm exit status %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	kill(p, 9);
	waitpid(p, &st, 0);
	reboot(RB_POWER_OFF);
	return 0;
}
