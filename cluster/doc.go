// Package cluster holds the real-cluster test (cluster_test.go): every
// shipped example applied with kubectl apply -k to a real single-node
// Kubernetes cluster (internal/kubecluster) running the relay image built
// from this checkout. It has no code of its own.
package cluster
