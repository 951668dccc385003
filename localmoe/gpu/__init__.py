"""GPU tier: numba-cuda kernels and the runner that puts the dense part and the hot
experts in VRAM while cold experts run on the CPU kernels in the same step.

Nothing here is imported by the CPU path; `device.py` imports numba.cuda only when
a CUDA device is asked for. Under NUMBA_ENABLE_CUDASIM=1 the same kernels run on
numba-cuda's simulator (tests), with smaller launch shapes (`device.LAUNCH`).

device.py   device choice, launch shapes, the simulator switch
matvec.py   the gathered matvec kernel (mul_mat_id shape) built per weight type
q8_0.py q4_k.py q6_k.py q3_k.py floats.py   one row-dot device function per type
ops.py      RMS norm, RoPE, SwiGLU, residual adds, KV-cache store
attention.py  causal GQA attention over the fp16 KV cache in device memory
router.py   softmax / sigmoid routing with top-k
tier.py     the VRAM expert slots (LFU with decay, as the RAM tier)
runner.py   one forward pass with the dense part on the device
"""
