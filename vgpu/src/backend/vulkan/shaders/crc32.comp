// CRC-32 (IEEE 802.3, as zlib). A workgroup takes one group of `group` bytes
// (vgpu::backend::CRC_GROUP); each of its 256 invocations the CRC of its 1/256 of it, into
// partials[group index · 256 + invocation]; the host combines the partial CRCs in order. (Short
// loops: llvmpipe caps loop iterations per invocation.)
#version 450
layout(local_size_x = 256) in;
layout(push_constant) uniform P { uint len; uint group; } p;
layout(std430, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, binding = 1) writeonly buffer Out { uint partials[]; };
shared uint table[256];
void main() {
    uint t = gl_LocalInvocationID.x;
    uint c = t;
    for (int b = 0; b < 8; b++) {
        c = (c & 1u) != 0u ? (0xedb88320u ^ (c >> 1)) : (c >> 1);
    }
    table[t] = c;
    barrier();
    uint chunk = p.group / gl_WorkGroupSize.x;
    uint start = gl_WorkGroupID.x * p.group + t * chunk;
    uint end = min(start + chunk, p.len);
    uint crc = 0xffffffffu;
    for (uint i = start; i < end; i++) {
        uint byte = (src[i >> 2] >> ((i & 3u) * 8u)) & 0xffu;
        crc = table[(crc ^ byte) & 0xffu] ^ (crc >> 8);
    }
    partials[gl_WorkGroupID.x * gl_WorkGroupSize.x + t] = crc ^ 0xffffffffu;
}
