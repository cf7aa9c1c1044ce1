// C = A·B, row-major f32. Workgroup (x, y) computes rows x·rows.. of C (rows = vgpu_abi::
// kernel::SGEMM_GROUP_ROWS, the group) and columns y·64..; one invocation per element, so no
// invocation loops more than k times (llvmpipe caps loop iterations per invocation). Each
// element accumulates in the software GPU's order with fma.
#version 450
layout(local_size_x = 64, local_size_y = 16) in;
layout(push_constant) uniform P { uint m; uint n; uint k; uint rows; } p;
layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) writeonly buffer C { float c[]; };
void main() {
    uint r = gl_WorkGroupID.x * p.rows + gl_LocalInvocationID.y;
    uint j = gl_WorkGroupID.y * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
    if (gl_LocalInvocationID.y >= p.rows || r >= p.m || j >= p.n) {
        return;
    }
    precise float acc = 0.0;
    for (uint q = 0; q < p.k; q++) {
        acc = fma(a[r * p.k + q], b[q * p.n + j], acc);
    }
    c[r * p.n + j] = acc;
}
