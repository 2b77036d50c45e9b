"""The node proxy: detection, routing, balancing and forwarding for every enrolled pod."""
