"""Pure math of training objectives: losses and KL control (torch only, no models)."""
