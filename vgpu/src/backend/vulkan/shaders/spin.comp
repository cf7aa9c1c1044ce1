// Spins for up to `ticks` of the device clock. The host repeats such dispatches until a
// SPIN_US group's time has passed on its own clock (llvmpipe caps loop iterations, so one
// dispatch may end early), and can stop between them.
#version 450
#extension GL_EXT_shader_realtime_clock : require
#extension GL_ARB_gpu_shader_int64 : require
layout(local_size_x = 1) in;
layout(push_constant) uniform P { uint64_t ticks; } p;
layout(std430, binding = 0) buffer Sink { uint sink[]; };
void main() {
    uint64_t start = clockRealtimeEXT();
    uint spins = 0;
    while (clockRealtimeEXT() - start < p.ticks) {
        spins++;
    }
    // A side effect, so the loop cannot be removed.
    if (spins == 0xffffffffu) {
        sink[0] = spins;
    }
}
