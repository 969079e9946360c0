/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0) */
/*
 * /dev/wl0 interface of Bulkhead's virtio_wl guest driver. The ioctl numbers and struct
 * layouts are those ChromiumOS guests use, so their programs run unchanged. Note that the
 * _IOR/_IOW directions are the reverse of what the data does; the numbers are what matter.
 */
#ifndef _UAPI_LINUX_VIRTWL_H
#define _UAPI_LINUX_VIRTWL_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VIRTWL_SEND_MAX_ALLOCS 28

#define VIRTWL_IOCTL_BASE 'w'
#define VIRTWL_IO(nr) _IO(VIRTWL_IOCTL_BASE, nr)
#define VIRTWL_IOR(nr, type) _IOR(VIRTWL_IOCTL_BASE, nr, type)
#define VIRTWL_IOW(nr, type) _IOW(VIRTWL_IOCTL_BASE, nr, type)
#define VIRTWL_IOWR(nr, type) _IOWR(VIRTWL_IOCTL_BASE, nr, type)

enum virtwl_ioctl_new_type {
	VIRTWL_IOCTL_NEW_CTX = 0,	/* connect to the unnamed socket */
	VIRTWL_IOCTL_NEW_ALLOC = 1,	/* shared memory of `size` bytes */
	VIRTWL_IOCTL_NEW_PIPE_READ = 2,	/* a pipe this guest reads */
	VIRTWL_IOCTL_NEW_PIPE_WRITE = 3,	/* a pipe this guest writes */
	VIRTWL_IOCTL_NEW_DMABUF = 4,	/* not supported: ENOTTY */
	VIRTWL_IOCTL_NEW_CTX_NAMED = 5,	/* connect to the socket called `name` */
};

#define VIRTWL_CTX_NAME_MAX_LEN 32

struct virtwl_ioctl_new {
	__u32 type;	/* enum virtwl_ioctl_new_type */
	int fd;		/* out: the new vfd's file descriptor */
	__u32 flags;	/* 0 */
	union {
		__u32 size;	/* NEW_ALLOC: bytes (rounded up to pages) */
		struct {
			__u32 width;
			__u32 height;
			__u32 format;
			__u32 stride0;
			__u32 stride1;
			__u32 stride2;
			__u32 offset0;
			__u32 offset1;
			__u32 offset2;
		} dmabuf;
		char name[VIRTWL_CTX_NAME_MAX_LEN];	/* NEW_CTX_NAMED, NUL-padded */
	};
};

struct virtwl_ioctl_txn {
	int fds[VIRTWL_SEND_MAX_ALLOCS];	/* SEND: ends at the first < 0; RECV: -1 unused */
	__u32 len;	/* SEND: bytes in data; RECV: in capacity, out bytes received */
	__u8 data[];
};

struct virtwl_ioctl_dmabuf_sync {
	__u32 flags;
};

#define VIRTWL_IOCTL_NEW VIRTWL_IOWR(0x00, struct virtwl_ioctl_new)		/* 0xC0307700 */
#define VIRTWL_IOCTL_SEND VIRTWL_IOR(0x01, struct virtwl_ioctl_txn)		/* 0x80747701 */
#define VIRTWL_IOCTL_RECV VIRTWL_IOW(0x02, struct virtwl_ioctl_txn)		/* 0x40747702 */
#define VIRTWL_IOCTL_DMABUF_SYNC VIRTWL_IOR(0x03, struct virtwl_ioctl_dmabuf_sync)	/* 0x80047703 */

#endif /* _UAPI_LINUX_VIRTWL_H */
