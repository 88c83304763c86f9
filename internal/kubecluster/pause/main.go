// Command pause is the real-cluster test's pod sandbox image ("pause"):
// nothing can be pulled there, so internal/kubecluster builds this instead
// of registry.k8s.io/pause. It holds the pod's namespaces open by running,
// and exits on SIGTERM or SIGINT (as PID 1 it gets no default handlers).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
