"""Training-step speed of Swin4D v7/v9/v11 (5m/51m/202m, 96^3 x 20) and GPT 202m with SDPA, flex
attention and torch.compile, on the GPU it finds (`make bench-gpu`; a small CPU run without one).
SWIFT_REPO=<checkout of Transconnectome/SwiFT> adds SwiFT's ver7 side by side."""

from brainfm.bench.gpu import main

if __name__ == "__main__":
    main()
