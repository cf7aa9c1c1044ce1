// Sum of u32 as u64: one workgroup sums one group of `group` elements (vgpu_abi::kernel::
// REDUCE_GROUP) into partials[group index]; the host adds the partials (wrapping).
#version 450
#extension GL_ARB_gpu_shader_int64 : require
layout(local_size_x = 256) in;
layout(push_constant) uniform P { uint n; uint group; } p;
layout(std430, binding = 0) readonly buffer X { uint x[]; };
layout(std430, binding = 1) writeonly buffer Out { uint64_t partials[]; };
shared uint64_t sums[256];
void main() {
    uint base = gl_WorkGroupID.x * p.group;
    uint64_t s = 0;
    for (uint i = gl_LocalInvocationID.x; i < p.group; i += gl_WorkGroupSize.x) {
        uint k = base + i;
        if (k < p.n) {
            s += uint64_t(x[k]);
        }
    }
    sums[gl_LocalInvocationID.x] = s;
    barrier();
    for (uint w = gl_WorkGroupSize.x / 2; w > 0; w /= 2) {
        if (gl_LocalInvocationID.x < w) {
            sums[gl_LocalInvocationID.x] += sums[gl_LocalInvocationID.x + w];
        }
        barrier();
    }
    if (gl_LocalInvocationID.x == 0) {
        partials[gl_WorkGroupID.x] = sums[0];
    }
}
