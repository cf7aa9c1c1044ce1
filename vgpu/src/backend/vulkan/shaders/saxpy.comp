// y = a·x + y over n f32, fused (bit-exact with Rust's f32::mul_add). One workgroup is one
// SAXPY group of vgpu_abi::kernel::SAXPY_GROUP elements (the push constant `group`).
#version 450
layout(local_size_x = 256) in;
layout(push_constant) uniform P { uint n; float a; uint group; } p;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
void main() {
    uint base = gl_WorkGroupID.x * p.group;
    for (uint i = gl_LocalInvocationID.x; i < p.group; i += gl_WorkGroupSize.x) {
        uint k = base + i;
        if (k < p.n) {
            precise float r = fma(p.a, x[k], y[k]);
            y[k] = r;
        }
    }
}
