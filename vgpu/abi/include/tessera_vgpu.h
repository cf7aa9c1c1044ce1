/* SPDX-License-Identifier: Apache-2.0 */
/* Tessera vGPU hardware contract. GENERATED from vgpu/abi/src/lib.rs by
* `UPDATE_VGPU_HEADER=1 cargo test -p vgpu-abi`; do not edit. See docs/vgpu-spec.md. */
#ifndef TESSERA_VGPU_H
#define TESSERA_VGPU_H

#define TVGPU_VERSION_MAJOR                0x1ULL
#define TVGPU_VERSION_MINOR                0x1ULL
#define TVGPU_PCI_VENDOR_ID                0x7e55ULL
#define TVGPU_PCI_DEVICE_ID                0x1ULL
#define TVGPU_PCI_CLASS                    0x3ULL
#define TVGPU_PCI_SUBCLASS                 0x2ULL
#define TVGPU_PCI_BAR_REGS                 0x0ULL
#define TVGPU_PCI_BAR_REGS_SIZE            0x10000ULL
#define TVGPU_PCI_BAR_VRAM                 0x2ULL
#define TVGPU_PCI_MSIX_VECTORS             0x10ULL
#define TVGPU_PCI_MSIX_TABLE_OFFSET        0x4000ULL
#define TVGPU_PCI_MSIX_PBA_OFFSET          0x5000ULL
#define TVGPU_REG_MAGIC                    0x0ULL
#define TVGPU_MAGIC_VALUE                  0x54455353ULL
#define TVGPU_REG_VERSION                  0x4ULL
#define TVGPU_REG_CAPS                     0x8ULL
#define TVGPU_REG_NUM_CONTEXTS             0xcULL
#define TVGPU_REG_VRAM_SIZE_LO             0x10ULL
#define TVGPU_REG_VRAM_SIZE_HI             0x14ULL
#define TVGPU_REG_KERNELS                  0x18ULL
#define TVGPU_REG_MAX_RING_ENTRIES         0x1cULL
#define TVGPU_REG_STATUS                   0x20ULL
#define TVGPU_REG_RESET                    0x24ULL
#define TVGPU_RESET_VALUE                  0x52535431ULL
#define TVGPU_REG_INT_STATUS               0x28ULL
#define TVGPU_REG_INT_MASK                 0x2cULL
#define TVGPU_REG_FAULT_ADDR_LO            0x30ULL
#define TVGPU_REG_FAULT_ADDR_HI            0x34ULL
#define TVGPU_REG_FAULT_CTX                0x38ULL
#define TVGPU_REG_FAULT_CODE               0x3cULL
#define TVGPU_REG_FAULT_COUNT              0x40ULL
#define TVGPU_REG_FAULT_VECTOR             0x44ULL
#define TVGPU_REG_TIMESTAMP_LO             0x48ULL
#define TVGPU_REG_TIMESTAMP_HI             0x4cULL
#define TVGPU_REG_WAIT_CTX                 0x50ULL
#define TVGPU_REG_WAIT_VALUE               0x54ULL
#define TVGPU_REG_WAIT                     0x58ULL
#define TVGPU_DOORBELL_BASE                0x1000ULL
#define TVGPU_DOORBELL_STRIDE              0x8ULL
#define TVGPU_CTX_BASE                     0x2000ULL
#define TVGPU_CTX_STRIDE                   0x80ULL
#define TVGPU_CTX_CONTROL                  0x0ULL
#define TVGPU_CTX_STATUS                   0x4ULL
#define TVGPU_CTX_PT_ROOT_LO               0x8ULL
#define TVGPU_CTX_PT_ROOT_HI               0xcULL
#define TVGPU_CTX_RING_BASE_LO             0x10ULL
#define TVGPU_CTX_RING_BASE_HI             0x14ULL
#define TVGPU_CTX_RING_SIZE                0x18ULL
#define TVGPU_CTX_RING_HEAD                0x1cULL
#define TVGPU_CTX_RING_TAIL                0x20ULL
#define TVGPU_CTX_TLB_INVALIDATE           0x24ULL
#define TVGPU_CTX_FENCE_LO                 0x28ULL
#define TVGPU_CTX_FENCE_HI                 0x2cULL
#define TVGPU_CTX_IRQ_VECTOR               0x30ULL
#define TVGPU_CTX_FAULT_CODE               0x34ULL
#define TVGPU_CTX_FAULT_ADDR_LO            0x38ULL
#define TVGPU_CTX_FAULT_ADDR_HI            0x3cULL
#define TVGPU_CTX_TAIL_ADDR_LO             0x40ULL
#define TVGPU_CTX_TAIL_ADDR_HI             0x44ULL
#define TVGPU_CAP_HUGE_PAGES               0x1ULL
#define TVGPU_CAP_SYSMEM                   0x2ULL
#define TVGPU_CAP_TIMESTAMPS               0x4ULL
#define TVGPU_CAP_WAIT                     0x8ULL
#define TVGPU_CAP_TAIL_SHADOW              0x10ULL
#define TVGPU_CAP_VRAM_TRAPPED             0x20ULL
#define TVGPU_STATUS_READY                 0x1ULL
#define TVGPU_STATUS_FAULTED               0x2ULL
#define TVGPU_INT_FAULT                    0x1ULL
#define TVGPU_INT_FENCE_SHIFT              0x10ULL
#define TVGPU_CTX_CONTROL_ENABLE           0x1ULL
#define TVGPU_CTX_CONTROL_RESET            0x2ULL
#define TVGPU_CTX_CONTROL_POLL             0x4ULL
#define TVGPU_CTX_CONTROL_SUPPRESS         0x8ULL
#define TVGPU_CAP_DOORBELL_SUPPRESS        0x40ULL
#define TVGPU_SHADOW_TAIL                  0x0ULL
#define TVGPU_SHADOW_HINT                  0x4ULL
#define TVGPU_SHADOW_POLLING               0x1ULL
#define TVGPU_CTX_STATUS_ENABLED           0x1ULL
#define TVGPU_CTX_STATUS_BUSY              0x2ULL
#define TVGPU_CTX_STATUS_FAULTED           0x4ULL
#define TVGPU_WAIT_DONE                    0x0ULL
#define TVGPU_WAIT_FAULTED                 0x1ULL
#define TVGPU_WAIT_TIMEOUT                 0x2ULL
#define TVGPU_WAIT_INVALID                 0x3ULL
#define TVGPU_FAULT_NONE                   0x0ULL
#define TVGPU_FAULT_NOT_PRESENT            0x1ULL
#define TVGPU_FAULT_WRITE_PROTECT          0x2ULL
#define TVGPU_FAULT_VRAM_RANGE             0x3ULL
#define TVGPU_FAULT_DMA_DOMAIN             0x4ULL
#define TVGPU_FAULT_BAD_OPCODE             0x5ULL
#define TVGPU_FAULT_BAD_PACKET             0x6ULL
#define TVGPU_FAULT_RING_CONFIG            0x7ULL
#define TVGPU_FAULT_BAD_ROOT               0x8ULL
#define TVGPU_FAULT_BAD_PTE                0x9ULL
#define TVGPU_FAULT_VA_RANGE               0xaULL
#define TVGPU_FAULT_TIMEOUT                0xbULL
#define TVGPU_PACKET_SIZE                  0x40ULL
#define TVGPU_PACKET_NUM_ARGS              0x7ULL
#define TVGPU_OP_NOP                       0x0ULL
#define TVGPU_OP_COPY                      0x1ULL
#define TVGPU_OP_FILL                      0x2ULL
#define TVGPU_OP_DISPATCH                  0x3ULL
#define TVGPU_OP_FENCE                     0x4ULL
#define TVGPU_OP_TIMESTAMP                 0x5ULL
#define TVGPU_FENCE_IRQ                    0x1ULL
#define TVGPU_KERNEL_SAXPY                 0x1ULL
#define TVGPU_KERNEL_SGEMM                 0x2ULL
#define TVGPU_KERNEL_REDUCE_SUM            0x3ULL
#define TVGPU_KERNEL_CRC32                 0x4ULL
#define TVGPU_KERNEL_SPIN_US               0x5ULL
#define TVGPU_KERNELS_ALL                  0x3eULL
#define TVGPU_KERNEL_SAXPY_GROUP           0x4000ULL
#define TVGPU_KERNEL_SGEMM_GROUP_ROWS      0x10ULL
#define TVGPU_KERNEL_REDUCE_GROUP          0x10000ULL
#define TVGPU_PTE_PRESENT                  0x1ULL
#define TVGPU_PTE_WRITABLE                 0x2ULL
#define TVGPU_PTE_VRAM                     0x4ULL
#define TVGPU_PTE_HUGE                     0x80ULL
#define TVGPU_PTE_ADDR_MASK                0xffffffffff000ULL
#define TVGPU_PTE_RESERVED_MASK            0xfff0000000000f78ULL
#define TVGPU_PTE_VA_BITS                  0x30ULL
#define TVGPU_PTE_LEVELS                   0x4ULL
#define TVGPU_PTE_ENTRIES                  0x200ULL
#define TVGPU_PAGE_SIZE                    0x1000ULL
#define TVGPU_MAX_CONTEXTS                 0x10ULL
#define TVGPU_MAX_RING_ENTRIES             0x1000ULL
#define TVGPU_MAX_TRANSFER                 0x40000000ULL
#define TVGPU_MAX_SGEMM_DIM                0x1000ULL
#define TVGPU_MAX_SPIN_US                  0xf4240ULL
#define TVGPU_MAX_SPIN_GROUPS              0x10000ULL
#define TVGPU_WAIT_TIMEOUT_MS              0x64ULL

#define TVGPU_CTX_REG(ctx, reg) (TVGPU_CTX_BASE + (ctx) * TVGPU_CTX_STRIDE + (reg))
#define TVGPU_DOORBELL(ctx) (TVGPU_DOORBELL_BASE + (ctx) * TVGPU_DOORBELL_STRIDE)
#define TVGPU_INT_FENCE(ctx) (1U << (TVGPU_INT_FENCE_SHIFT + (ctx)))

/* A command packet: 64 bytes, little-endian. */
struct tvgpu_packet {
	unsigned int opcode;
	unsigned int flags;
	unsigned long long args[7];
};

#endif /* TESSERA_VGPU_H */
