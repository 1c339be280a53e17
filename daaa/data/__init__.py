"""Image domains: folders, MNIST, MNIST-M, Office-31 and the embedded demo pair."""
