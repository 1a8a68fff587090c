"""Training: losses, optimizers, the jitted steps, the loop and the whole run."""
