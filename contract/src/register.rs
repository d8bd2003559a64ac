//! The node register annotation `hami.io/node-nvidia-register`. Owned by the scheduler work.
