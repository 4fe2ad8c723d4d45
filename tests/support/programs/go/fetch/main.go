// Command fetch is a statically linked HTTP client for graft's name tests
// (tests/e2e/test_names_go.py): built with CGO_ENABLED=0 it resolves names
// with Go's own resolver, which reads /etc/resolv.conf itself and sends its
// queries with raw system calls, never through glibc.
//
//	fetch URL
//
// It GETs URL with net/http (no proxy, whatever the environment says) and
// prints one JSON object: what Go's resolver answered for the URL's host
// ("dns", or "dns_error"), the addresses it dialed ("dialed"), the peer it
// got ("remote"), the status and body of the reply, or the error and its
// errno (0 when the error carries none). It exits 0 on a 200 reply, 1
// otherwise.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"sync"
	"syscall"
	"time"
)

type result struct {
	DNS      []string `json:"dns"`
	DNSError string   `json:"dns_error,omitempty"`
	Dialed   []string `json:"dialed"`
	Remote   string   `json:"remote,omitempty"`
	Status   int      `json:"status,omitempty"`
	Body     string   `json:"body,omitempty"`
	Error    string   `json:"error,omitempty"`
	Errno    int      `json:"errno"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: fetch URL")
		os.Exit(2)
	}
	// Already so without cgo; said here so that a cgo build of this file would still test Go's resolver.
	net.DefaultResolver.PreferGo = true
	res := fetch(os.Args[1])
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if res.Status != http.StatusOK {
		os.Exit(1)
	}
}

func fetch(url string) result {
	res := result{DNS: []string{}, Dialed: []string{}}
	var mu sync.Mutex // the trace's callbacks may run on the dialer's goroutines
	trace := &httptrace.ClientTrace{
		DNSDone: func(info httptrace.DNSDoneInfo) {
			mu.Lock()
			defer mu.Unlock()
			for _, a := range info.Addrs {
				res.DNS = append(res.DNS, a.String())
			}
			if info.Err != nil {
				res.DNSError = info.Err.Error()
			}
		},
		ConnectStart: func(_, addr string) {
			mu.Lock()
			defer mu.Unlock()
			res.Dialed = append(res.Dialed, addr)
		},
		GotConn: func(info httptrace.GotConnInfo) {
			mu.Lock()
			defer mu.Unlock()
			res.Remote = info.Conn.RemoteAddr().String()
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, url, nil)
	if err != nil {
		return failed(res, err)
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return failed(res, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return failed(res, err)
	}
	mu.Lock()
	defer mu.Unlock()
	res.Status, res.Body = resp.StatusCode, string(body)
	return res
}

func failed(res result, err error) result {
	var errno syscall.Errno
	res.Error = err.Error()
	if errors.As(err, &errno) {
		res.Errno = int(errno)
	}
	return res
}
