/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0) */
/*
 * virtio_wl wire format (device ID 63). All fields little-endian; this driver is for
 * little-endian guests only (like the ChromiumOS one).
 */
#ifndef _UAPI_LINUX_VIRTIO_WL_H
#define _UAPI_LINUX_VIRTIO_WL_H

#include <linux/types.h>

#define VIRTIO_ID_WL 63

#define VIRTWL_IN_BUFFER_SIZE 4096
#define VIRTWL_VQ_IN 0
#define VIRTWL_VQ_OUT 1
#define VIRTWL_QUEUE_COUNT 2
#define VIRTWL_MAX_ALLOC 0x800
#define VIRTWL_PFN_SHIFT 12

#define VIRTIO_WL_F_TRANS_FLAGS 1
#define VIRTIO_WL_F_SEND_FENCES 2
#define VIRTIO_WL_F_USE_SHMEM 3

enum virtio_wl_ctrl_type {
	VIRTIO_WL_CMD_VFD_NEW = 0x100,
	VIRTIO_WL_CMD_VFD_CLOSE,
	VIRTIO_WL_CMD_VFD_SEND,
	VIRTIO_WL_CMD_VFD_RECV,
	VIRTIO_WL_CMD_VFD_NEW_CTX,
	VIRTIO_WL_CMD_VFD_NEW_PIPE,
	VIRTIO_WL_CMD_VFD_HUP,
	VIRTIO_WL_CMD_VFD_NEW_DMABUF,
	VIRTIO_WL_CMD_VFD_DMABUF_SYNC,
	VIRTIO_WL_CMD_VFD_SEND_FOREIGN_ID,
	VIRTIO_WL_CMD_VFD_NEW_CTX_NAMED,

	VIRTIO_WL_RESP_OK = 0x1000,
	VIRTIO_WL_RESP_VFD_NEW = 0x1001,
	VIRTIO_WL_RESP_VFD_NEW_DMABUF = 0x1002,

	VIRTIO_WL_RESP_ERR = 0x1100,
	VIRTIO_WL_RESP_OUT_OF_MEMORY,
	VIRTIO_WL_RESP_INVALID_ID,
	VIRTIO_WL_RESP_INVALID_TYPE,
	VIRTIO_WL_RESP_INVALID_FLAGS,
	VIRTIO_WL_RESP_INVALID_CMD,
};

struct virtio_wl_ctrl_hdr {
	__le32 type;
	__le32 flags;
};

#define VIRTIO_WL_VFD_WRITE 0x1
#define VIRTIO_WL_VFD_READ 0x2
#define VIRTIO_WL_VFD_MAP 0x2
#define VIRTIO_WL_VFD_CONTROL 0x4
#define VIRTIO_WL_VFD_FENCE 0x8

#define VFD_HOST_VFD_ID_BIT 0x40000000

struct virtio_wl_ctrl_vfd {
	struct virtio_wl_ctrl_hdr hdr;
	__le32 vfd_id;
};

/* The guest's 64-byte form; the device reads and writes the first 32 (or 64 with a name). */
struct virtio_wl_ctrl_vfd_new {
	struct virtio_wl_ctrl_hdr hdr;
	__le32 vfd_id;
	__le32 flags;
	__le64 pfn;
	__le32 size;
	union {
		struct {
			__le32 width, height, format;
			__le32 stride0, stride1, stride2;
			__le32 offset0, offset1, offset2;
		} dmabuf;
		char name[32];
	};
} __attribute__((aligned(8)));

struct virtio_wl_ctrl_vfd_send {
	struct virtio_wl_ctrl_hdr hdr;
	__le32 vfd_id;
	__le32 vfd_count;
	/* vfd_count __le32 ids, then the data */
};

struct virtio_wl_ctrl_vfd_recv {
	struct virtio_wl_ctrl_hdr hdr;
	__le32 vfd_id;
	__le32 vfd_count;
	/* vfd_count __le32 ids, then the data */
};

#endif /* _UAPI_LINUX_VIRTIO_WL_H */
