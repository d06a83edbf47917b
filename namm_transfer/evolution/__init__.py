"""CMA-ES evolution of NAMM parameters on language tasks."""
