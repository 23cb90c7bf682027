"""DIFFA-2 model components: speech encoder, adapters and diffusion LLM backbone."""
