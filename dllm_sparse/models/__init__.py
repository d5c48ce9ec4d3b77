"""Models: one profile per architecture family (:mod:`.families`), loading (:mod:`.loading`), the native LLaDA
(:mod:`.llada`), the AR-to-diffusion conversion (:mod:`.adapt`) and the embedded diffusion twin (:mod:`.twin`)."""
