"""The data plane: bulk bytes between peers without gRPC.

A node registers memory regions once (`base.Region`) and grants descriptors of ranges in them
(`base.Issuer`); a peer reads or writes those ranges one-sidedly over a transport chosen per peer
(`registry.choose`: rdma > shm > tcp). Implementations load lazily by name, so a host without
pyverbs imports everything. See docs/transports.md.
"""
