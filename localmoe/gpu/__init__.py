"""GPU tier: numba-cuda kernels and the runner that puts the dense part and the hot
experts in VRAM while cold experts run on the CPU kernels in the same step.

Nothing here is imported by the CPU path; `device.py` imports numba.cuda only when
a CUDA device is asked for. Under NUMBA_ENABLE_CUDASIM=1 the same kernels run on
numba-cuda's simulator (tests), with smaller launch shapes (`device.LAUNCH`).

device.py   device choice, launch shapes, the simulator switch
matvec.py   the gathered matvec kernel (mul_mat_id shape) built per weight type
q8_0.py q4_k.py q6_k.py q3_k.py floats.py   one row-dot device function per type
ops.py      RMS norm, RoPE, SwiGLU, residual and gated adds, KV-cache store, copies
attention.py  causal GQA attention over the fp16 KV cache in device memory
mla.py      DeepSeek-V2/V3 latent attention (attn_k_b/attn_v_b or legacy attn_kv_b)
router.py   softmax / sigmoid routing with top-k (DeepSeek-V3: selection bias, groups)
tier.py     the VRAM expert slots (LFU with decay, as the RAM tier)
archs.py    each architecture's quirks for the runner (ARCHS)
runner.py   one forward pass with the dense part on the device
"""
