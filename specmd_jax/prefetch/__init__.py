"""Expert prefetching: score tables that predict the experts of coming steps, and the policies that use them."""
