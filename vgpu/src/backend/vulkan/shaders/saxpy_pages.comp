// y = a·x + y as saxpy.comp, with x and y reached through a page table of device addresses
// instead of staging buffers: binding 0 holds one 64-bit buffer device address per 4 KiB
// page, x's pages first, then y's from index `y_pages`. The operands start on a page. This is
// the device-address alternative to gathering scattered operands into staging buffers
// (issue #19, item 3); VulkanGpu::scatter_costs measures the two side by side.
#version 450
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require
layout(local_size_x = 256) in;
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Page { float v[1024]; };
layout(push_constant) uniform P { uint n; float a; uint group; uint y_pages; } p;
layout(std430, binding = 0) readonly buffer Table { uint64_t page[]; };
void main() {
    uint base = gl_WorkGroupID.x * p.group;
    for (uint i = gl_LocalInvocationID.x; i < p.group; i += gl_WorkGroupSize.x) {
        uint k = base + i;
        if (k < p.n) {
            Page x = Page(page[k >> 10]);
            Page y = Page(page[p.y_pages + (k >> 10)]);
            precise float r = fma(p.a, x.v[k & 1023u], y.v[k & 1023u]);
            y.v[k & 1023u] = r;
        }
    }
}
